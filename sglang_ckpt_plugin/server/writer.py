"""One writer of the model at a time, in each scheduler (TP-rank) process.

Everything that loads into the live model or changes its objects holds this lock for the whole of it: every real
``load_weights`` the plugin drives (streaming push, commit of a staged update) or observes (SGLang's trainer,
tensor and disk paths), and every dry run, which points the parameters' ``weight_loader`` at stand-ins for its
duration. So a dry run on the staging thread can never catch a real load in the middle (its recorders would
swallow the real writes), and two dry runs never restore each other's recorders.

Reentrant: a hooked SGLang load dry-runs each of its calls under the lock it already holds. Nothing holding it
waits on another TP rank's lock-holder: dry runs make no collective call, so a rank's scheduler thread that waits
here only waits for its own staging thread's dry run to end.
"""

from __future__ import annotations

import threading

_model_lock = threading.RLock()


def exclusive():
    """``with exclusive(): ...`` — the only writer of this process's model for the block."""
    return _model_lock
