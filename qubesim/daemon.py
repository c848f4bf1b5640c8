"""qubesim's long-lived processes (the dom0 holder, the qrexec daemon, qube monitors).

A daemon is `python -m MODULE NOTIFY_FD`, detached in its own session and reparented to init (so
that no long-lived caller collects zombies). It writes one line on NOTIFY_FD: `ready PID`, or what
went wrong; the caller waits for that line, so a start either succeeded or says why not.
Singletons (dom0, qrexec) are recorded by pid and start time under run/, so that a stale record
(after a reboot, or a crash) is recognised and the daemon started again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys

from qubesim import linux
from qubesim.errors import QubesimError
from qubesim.layout import Layout

READY = "ready"
QREXEC = "qrexecd"  # the qrexec daemon (qubesim.qrexec_daemon), which every qube connects to


def spawn(layout: Layout, module: str, log_name: str, stdin: bytes = b"") -> tuple[int | None, str]:
    """Run `python -m module NOTIFY_FD` detached; return its pid (None unless ready) and answer."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    with open(layout.log(log_name), "ab") as log:
        process = subprocess.Popen(
            ["setsid", "--fork", sys.executable, "-m", module, str(write_end)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            pass_fds=(write_end,),
            env={**os.environ, "QUBESIM_HOME": str(layout.home)},
        )
    os.close(write_end)
    assert process.stdin is not None
    process.stdin.write(stdin)
    process.stdin.close()
    with os.fdopen(read_end, "rb") as notify_end:
        answer = notify_end.read().decode(errors="replace").strip()
    process.wait()
    word, _, pid = answer.partition(" ")
    if word == READY and pid.isdigit():
        return int(pid), READY
    return None, answer or f"no answer; see {layout.log(log_name)}"


def notify(fd: int, answer: str) -> None:
    os.write(fd, f"{answer}\n".encode())
    os.close(fd)


def notify_ready(fd: int) -> None:
    notify(fd, f"{READY} {os.getpid()}")


def is_ready(answer: str) -> bool:
    return answer.partition(" ")[0] == READY


def running_singleton(layout: Layout, name: str) -> int | None:
    """The pid of the live singleton daemon `name`, or None."""
    try:
        record = json.loads((layout.runtime / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    pid = int(record["pid"])
    return pid if linux.process_start_time(pid) == record["start_time"] else None


def ensure_singleton(layout: Layout, name: str, module: str) -> int:
    """Start the singleton daemon `name` unless it runs; return its pid."""
    pid = running_singleton(layout, name)
    if pid is not None:
        return pid
    layout.runtime.mkdir(parents=True, exist_ok=True)
    with open(layout.runtime / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pid = running_singleton(layout, name)
        if pid is None:
            pid, answer = spawn(layout, module, name)
            if pid is None:
                raise QubesimError(f"{name} could not be started: {answer}")
            record = {"pid": pid, "start_time": linux.process_start_time(pid)}
            (layout.runtime / f"{name}.json").write_text(json.dumps(record))
    return pid


def ensure_qrexec(layout: Layout) -> int:
    return ensure_singleton(layout, QREXEC, "qubesim.qrexec_daemon")


def stop_singleton(layout: Layout, name: str) -> None:
    pid = running_singleton(layout, name)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    (layout.runtime / f"{name}.json").unlink(missing_ok=True)
