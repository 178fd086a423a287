"""``python -m ssl3d.inference.process_guard CMD...``: run CMD in a process group that ends with its parent.

``run_nnunet`` starts every stock nnU-Net / ssl3d command through this guard. The guard leads a new session
(``start_new_session``), so CMD and everything CMD forks (``nnUNetv2_train``, its data-loader workers) share one
process group that a Ctrl-C in the terminal does not reach directly. The guard asks the kernel for SIGTERM when
its parent dies (``PR_SET_PDEATHSIG``; this also covers a ``kill -9`` of the parent, which no handler sees) and on
SIGTERM/SIGINT/SIGHUP ends the whole group: SIGTERM, ``GRACE_S`` seconds, then SIGKILL. Kept free of heavy
imports: it starts in tens of milliseconds.
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ssl3d.utils import BadInputError, die_with_parent

GRACE_S = 5.0
PARENT_ENV = "SSL3D_GUARD_PARENT"  # pid of the process that started the guard (the kernel's parent may differ)
FDS_ENV = "SSL3D_GUARD_FDS"  # inherited descriptors (an arm's owner lock) handed on to CMD
LOCK_FDS_ENV = "SSL3D_LOCK_FDS"  # the same descriptors, for CMD's own guarded commands (ssl_finetune -> train)


def end_group(pgid: int, child: subprocess.Popen | None = None, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the group, up to ``grace_s`` for ``child`` to exit, then SIGKILL to whatever is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while child is not None and _running(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def owner_lock(path: str | os.PathLike, what: str) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (the file says who holds it); yields the descriptor so children can
    inherit it: the lock stays taken while any process of the run lives, even after a ``kill -9`` of its starter.
    Raises :class:`~ssl3d.utils.BadInputError` naming ``what`` when another live run holds it."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BadInputError(what, f"in use by another run (pid {owner} or a process it started); wait for it to end "
                                  f"or stop it, then rerun") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)  # the lock goes once every inherited copy is closed too


def run_guarded(cmd: Sequence[str], env: dict, pass_fds: Sequence[int] = (), **popen_kwargs) -> int:
    """Run ``cmd`` under the guard in its own session; SIGTERM/SIGINT/SIGHUP here end its whole group first
    (then SIGINT raises KeyboardInterrupt, the others SystemExit(128 + signal)). Returns the exit status."""
    fds = [fd for fd in pass_fds if _is_open(fd)]
    env = {**env, PARENT_ENV: str(os.getpid()), FDS_ENV: ",".join(map(str, fds))}
    proc = subprocess.Popen([sys.executable, "-m", "ssl3d.inference.process_guard", *cmd], env=env,
                            start_new_session=True, pass_fds=fds, **popen_kwargs)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        end_group(proc.pid, proc)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in handled} if main_thread else {}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + received[0])
    return rc


def _running(pid: int) -> bool:
    """Alive and not a zombie. Not ``Popen.poll``: inside a signal handler that interrupted ``Popen.wait`` the
    wait lock is taken and ``poll`` always answers None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 only tells whether the pid exists
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    parent = int(os.environ.pop(PARENT_ENV, os.getppid()))
    fds = [int(f) for f in os.environ.pop(FDS_ENV, "").split(",") if f]
    child: subprocess.Popen | None = None

    def stop(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # the group's SIGTERM reaches the guard too
        end_group(os.getpgrp(), child)  # the SIGKILL ends the guard as well
        os._exit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, stop)
    die_with_parent(parent)
    child = subprocess.Popen(argv, pass_fds=fds, env={**os.environ, LOCK_FDS_ENV: ",".join(map(str, fds))})
    rc = child.wait()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
