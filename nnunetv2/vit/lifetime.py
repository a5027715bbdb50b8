"""Worker processes that end with the command that started them: after a ``kill -9`` of a command, none lives on.

nnU-Net starts workers two ways. Forked ones (batchgenerators' augmentation workers, ``multiprocessing.Manager``'s
server in upstream's prediction, the default ``Pool``) inherit an at-fork hook that arms ``PR_SET_PDEATHSIG``.
Spawned ones (``multiprocessing.get_context("spawn")``: upstream's preprocessing and export workers) are fresh
interpreters that inherit nothing of the kind; each arms it itself when it imports ``nnunetv2``, which every
worker running upstream's code does (``nnunetv2/__init__.py`` calls ``end_with_the_process_that_spawned_this``),
if the environment variable ``END_WITH_PID`` names its parent. ``end_workers_with_this_process`` sets it.

The kernel sends the signal when the *thread* that started the child ends. Forks are armed only from the main
thread; a spawned child cannot tell which thread started it, so processes spawned from another thread of a
command (a ``Pool`` replacing a dead worker) end with that thread. Linux only; elsewhere nothing changes.

Imports only the standard library: every spawned worker runs this.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Optional

END_WITH_PID = "NNUNET_VIT_END_WITH_PID"  # environment: the process whose spawned children end with it
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_fork_hook_registered = False


def end_workers_with_this_process() -> None:
    """Make every worker this process starts, forked or spawned, end when it dies (and their workers with them).
    For commands; this process itself may outlive its parent (a command started with nohup from a closed shell)."""
    if not sys.platform.startswith("linux"):
        return
    end_forked_workers_with_this_process()
    os.environ[END_WITH_PID] = str(os.getpid())


def end_with_the_process_that_spawned_this() -> None:
    """In a process spawned by one that called ``end_workers_with_this_process``: end with that process (at once
    if it is gone already), and make this one's own workers end with this one. Elsewhere: nothing."""
    parent = os.environ.get(END_WITH_PID, "")
    if not sys.platform.startswith("linux") or not parent.isdigit() or int(parent) == os.getpid():
        return
    if os.getppid() == int(parent):
        _set_parent_death_signal(parent=int(parent))
        end_workers_with_this_process()
    elif not process_alive(int(parent)):  # the command died before this process got here
        os._exit(1)
    # else: started by something the command started (a shell, ...), which decides how long it lives


def end_forked_workers_with_this_process() -> None:
    """Make every process this one forks from its main thread (nnU-Net's data-augmentation workers) end when this
    process dies (Linux only). This process itself may outlive its parent."""
    global _fork_hook_registered
    if not sys.platform.startswith("linux") or _fork_hook_registered:
        return
    _fork_hook_registered = True
    main_thread = threading.main_thread().ident
    forked_from_main = []

    def before_fork() -> None:
        forked_from_main[:] = [threading.get_ident() == main_thread, os.getpid()]

    def in_child() -> None:
        # The signal follows the forking *thread*: only a fork from the main thread lives as long as its process.
        if forked_from_main and forked_from_main[0]:
            _set_parent_death_signal(parent=forked_from_main[1])

    os.register_at_fork(before=before_fork, after_in_child=in_child)


def die_with_parent() -> None:
    """For helper processes (DDP workers): end when the process that started them dies, and so do their workers."""
    if sys.platform.startswith("linux"):
        _set_parent_death_signal()
        end_forked_workers_with_this_process()


def _set_parent_death_signal(parent: Optional[int] = None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def process_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process now has that number
        return True
    return True
