"""Starting qubesim's long-lived processes (the dom0 holder, qube monitors) detached from callers.

A daemon gets the write end of a pipe as its last argument and writes one line on it: `ready`, or
what went wrong. The caller waits for that line, so a start either succeeded or says why not.
"""

from __future__ import annotations

import os
import subprocess
import sys

from qubesim.layout import Layout

READY = "ready"


def spawn(layout: Layout, module: str, log_name: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run `python -m module NOTIFY_FD` in its own session; return its pid and its first line."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    read_end, write_end = os.pipe()
    with open(layout.log(log_name), "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, str(write_end)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=log,
            pass_fds=(write_end,),
            start_new_session=True,
            env={**os.environ, "QUBESIM_HOME": str(layout.home)},
        )
    os.close(write_end)
    assert process.stdin is not None
    process.stdin.write(stdin)
    process.stdin.close()
    with os.fdopen(read_end, "rb") as notify:
        answer = notify.read().decode(errors="replace").strip()
    if answer != READY:
        process.wait()
    return process.pid, answer or f"no answer; see {layout.log(log_name)}"


def notify(fd: int, answer: str) -> None:
    os.write(fd, f"{answer}\n".encode())
    os.close(fd)
