"""Run one command inside a running qube: `python -S -I enter.py PID /PATH/TO/COMMAND ARGS...`.

What `nsenter --target=PID --mount --uts --ipc --net --pid --root --wd` does, with one difference
that matters once systemd is the qube's init: at shutdown systemd stops every process of the qube
(SIGSTOP, then SIGTERM, then SIGCONT), and nsenter, seeing its child stopped, stops itself too and
then is never continued, so the child's exit is never collected and the qube's pid namespace can
never end. This parent waits for its child without following its stops. It exits with the child's
code, or dies of the child's signal; the signals that end a caller are passed on to the child.
It runs for every qrexec call, so it stands alone (no site, no qubesim import) to start fast.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# Entered in this order: the mount namespace last, so that /proc/PID stays reachable until then.
NAMESPACES = ("ipc", "uts", "net", "pid", "mnt")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _setns(descriptor: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(descriptor, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


def _enter(pid: int) -> None:
    """Join the qube's namespaces and its root; the pid namespace takes effect for children."""
    descriptors = [os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY) for name in NAMESPACES]
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    for descriptor in descriptors:
        _setns(descriptor)
        os.close(descriptor)
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    os.close(root)


def _wait(child: int) -> int:
    def forward(signum: int, _frame: object) -> None:
        os.kill(child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    pid, command = int(argv[0]), argv[1:]
    try:
        _enter(pid)
    except OSError as error:
        print(f"qubesim: cannot enter the qube (pid {pid}): {error}", file=sys.stderr)
        return 1
    child = os.fork()
    if child == 0:
        try:
            os.execv(command[0], command)  # a path: after chroot no module may load, PATH's neither
        except OSError as error:
            print(f"qubesim: {command[0]}: {error}", file=sys.stderr)
            os._exit(127)
    return _wait(child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
