"""A second SGLang plugin, for the tests only: SGLang loads it (entry point group ``sglang.srt.plugins``) in every
server process when this directory is on the server's PYTHONPATH, as it loads sglang-ckpt-plugin.

Armed by a file: when ``$CKPT_TEST_FAULTS_DIR/fail-next-commit`` exists, the next commit of a staged update on
this rank loads its first bucket into the model, then fails (the file is consumed), as a commit that dies part-way
would. The plugin under test is not changed; this wraps its commit from outside.
"""

import os
from pathlib import Path


def register():
    from sglang_ckpt_plugin.server import receiver

    original = receiver.ReceiveSession.commit

    def commit(self):
        flag = Path(os.environ.get("CKPT_TEST_FAULTS_DIR", "/nonexistent")) / "fail-next-commit"
        try:
            flag.unlink()
        except FileNotFoundError:
            return original(self)
        load, loaded = self.load_weights, []

        def load_then_fail(weights):
            if loaded:
                raise RuntimeError("commit fault injected by the test")
            loaded.append(True)
            return load(weights)

        self.load_weights = load_then_fail
        try:
            return original(self)
        finally:
            self.load_weights = load

    receiver.ReceiveSession.commit = commit
