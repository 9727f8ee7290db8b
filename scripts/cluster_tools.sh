#!/usr/bin/env bash
# What a cluster in one box (sglang_ckpt_plugin/demo/cluster.py) needs of the machine, and what Mooncake Transfer
# Engine (the p2p transport) needs at import (libibverbs.so.1): installed where missing.
set -euo pipefail
need=()
for tool in ip:iproute2 tc:iproute2 nft:nftables losetup:util-linux mount:mount mkfs.ext4:e2fsprogs; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 ' || need+=(libibverbs1)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "cluster tools missing (${need[*]}): install them as root; the cluster tests are skipped without root" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u)
