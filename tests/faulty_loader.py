"""The real loader CLI with one fault injected, for the fault tests (run as a script, never imported by the
product): ``python faulty_loader.py MODE -- <loader args>``.

MODE kill-after-2: SIGKILL itself after sending the second bucket, once the first was loaded.
MODE stall-before-buckets: after the server mapped the buffers, sleep instead of filling the first bucket.
MODE stall-after-first-bucket: send the first bucket, wait until the server loaded it, say so on stdout, sleep.
MODE corrupt-digests: with --verify, announce wrong digests (as if the bytes changed on the way).
MODE corrupt-tp1-after-first: the channel to server TP rank 1 announces wrong digests from its second bucket on
(TP rank 1 loads bucket 0, then refuses bucket 1; TP rank 0 alone would have succeeded).
MODE oom: under torchrun, loader rank CKPT_TEST_RANK fails to allocate its bucket buffers (as a CUDA OOM would).
MODE pause-after-first-bucket: once the server took bucket 0, sleep CKPT_TEST_PAUSE_S seconds, then go on.
MODE kill-in-staging: SIGKILL at a random point of a two-phase update (see below).
MODE kill-before-commit: SIGKILL once every bucket is staged, instead of committing.
Runs with --transfer copy and --two-phase off unless the arguments name them.
"""

import os
import signal
import sys
import time

from sglang_ckpt_plugin.loader import cli, filler, push

mode, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
if "--transfer" not in args:
    args += ["--transfer", "copy"]  # the faults are injected on the bucket-buffer path unless a test says otherwise
if "--two-phase" not in args:
    args += ["--two-phase", "off"]  # ... of a streaming update, unless a test says otherwise

original_send = push.RankFeeder.send_bucket

if mode in ("kill-after-2", "stall-after-first-bucket"):

    def send_bucket(self, seq, bucket, digests, times, **kw):
        original_send(self, seq, bucket, digests, times, **kw)
        if mode == "stall-after-first-bucket":
            self._wait_reply(self._in_flight.popleft(), "load a bucket")  # the server wrote it into the model
            print(f"stalled after bucket {seq} was loaded", flush=True)
            time.sleep(3600)
        if seq == 1:
            # die once the server has certainly written bucket 0 (ZeroMQ sends are asynchronous: without this
            # wait the kill may come before bucket 0 left the process, which is a different fault)
            self._wait_reply(self._in_flight.popleft(), "load a bucket")
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)

    push.RankFeeder.send_bucket = send_bucket
elif mode == "corrupt-digests":

    def send_bucket(self, seq, bucket, digests, times, **kw):
        original_send(self, seq, bucket, [d ^ 1 for d in digests], times, **kw)

    push.RankFeeder.send_bucket = send_bucket
elif mode == "corrupt-tp1-after-first":

    def send_bucket(self, seq, bucket, digests, times, **kw):
        bad = self.endpoint.endswith("-cpu-tp1.sock") and seq >= 1
        original_send(self, seq, bucket, [d ^ 1 for d in digests] if bad else digests, times, **kw)

    push.RankFeeder.send_bucket = send_bucket
elif mode == "oom":
    from sglang_ckpt_plugin.loader import node_feed

    original_allocate = node_feed.NodeFeeder.allocate

    def allocate(self, *args, **kwargs):
        if os.environ.get("RANK", "0") == os.environ.get("CKPT_TEST_RANK", "0"):
            raise RuntimeError("CUDA out of memory (injected by the test)")
        return original_allocate(self, *args, **kwargs)

    node_feed.NodeFeeder.allocate = allocate
elif mode == "pause-after-first-bucket":

    def send_bucket(self, seq, bucket, digests, times, **kw):
        original_send(self, seq, bucket, digests, times, **kw)
        if seq == 0:
            self._wait_reply(self._in_flight.popleft(), "stage a bucket")
            print("paused after bucket 0", flush=True)
            time.sleep(float(os.environ.get("CKPT_TEST_PAUSE_S", "4")))

    push.RankFeeder.send_bucket = send_bucket
elif mode == "kill-in-staging":
    # SIGKILL at a random point of a two-phase update (seeded by CKPT_TEST_SEED), on loader rank CKPT_TEST_RANK only:
    # while reading bucket k ahead, or right after handing bucket k to the server
    import random

    rng = random.Random(int(os.environ.get("CKPT_TEST_SEED", "0")))
    where, at = rng.choice(["read", "send"]), rng.randrange(int(os.environ.get("CKPT_TEST_BUCKETS", "3")))
    counts = {"read": 0, "send": 0}
    doomed = os.environ.get("RANK", "0") == os.environ.get("CKPT_TEST_RANK", "0")

    def maybe_die(point):
        if doomed and point == where:
            if counts[point] == at:
                print(f"killed while staging: {point} #{at}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            counts[point] += 1

    original_fill = filler.BucketFiller.fill

    def fill(self, *args, **kwargs):
        maybe_die("read")
        return original_fill(self, *args, **kwargs)

    def send_bucket(self, seq, bucket, digests, times, **kw):
        original_send(self, seq, bucket, digests, times, **kw)
        maybe_die("send")

    filler.BucketFiller.fill = fill
    push.RankFeeder.send_bucket = send_bucket
elif mode == "kill-before-commit":
    from sglang_ckpt_plugin.loader import run

    def commit(self):
        print("staged; killed before the commit", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    run.Update.commit = commit
elif mode == "stall-before-buckets":
    filler.BucketFiller.fill = lambda self, *args, **kwargs: time.sleep(3600)
else:
    raise SystemExit(f"unknown mode {mode}")

sys.exit(cli.main(args))
