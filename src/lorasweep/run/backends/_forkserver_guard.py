"""Preloaded first by the local backend's forkserver: the server dies with the sweep.

multiprocessing's forkserver notices its parent's death only in its accept loop, that is after it
has preloaded torch/transformers/peft (8-10 s here). A sweep killed meanwhile would leave the
server, and the resource tracker that waits on it, running for those seconds. On Linux,
PR_SET_PDEATHSIG has the kernel SIGKILL the server the moment the sweep process dies. No thread is
started: the server forks the workers and must stay single-threaded. Workers have their own
watchdog (``local._watch_parent``); the death signal is not inherited across fork.

Import it only as a forkserver preload: importing arms the signal in the importing process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
SWEEP_PID_ENV = "LORASWEEP_SWEEP_PID"  # set by local.LocalBackend.run


def _arm() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    sweep = os.environ.get(SWEEP_PID_ENV)
    if sweep and sweep.isdigit() and os.getppid() != int(sweep):
        os._exit(3)  # the sweep died before the signal was armed


_arm()
