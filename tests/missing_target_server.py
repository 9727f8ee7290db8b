"""``python -m sglang.launch_server`` in a process where the plugin's release check also requires a name this
SGLang does not have (as a release that lacks a hooked target would): the start must fail with one clear line."""

import runpy

from sglang_ckpt_plugin.server import sglang_compat

sglang_compat.ACCESSED_NAMES = (*sglang_compat.ACCESSED_NAMES, "sglang.srt.managers.scheduler.Scheduler.no_such_hook")
runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
