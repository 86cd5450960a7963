"""DataLoader worker processes that end with the process that started them.

torch's workers watch their parent only between items, and a worker whose parent was killed
(``kill -9``, the OOM killer) while it was handing over a result blocks for ever: the result pipe stays
open because its sibling workers hold the other end. Such workers were left behind, holding memory, after
every killed ``prepare`` or ``predict`` with worker processes. Linux can kill a process when its parent
dies (``prctl(PR_SET_PDEATHSIG)``); nothing in torch or the standard library sets it, hence this helper.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def end_with_parent(worker_id: int = 0) -> None:
    """``worker_init_fn`` of a DataLoader: this worker is killed (SIGKILL) when its parent dies; it exits
    at once if the parent is already gone. No-op outside Linux."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(0)
