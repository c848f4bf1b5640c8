"""The process that stands for a running qube on the host, like a hypervisor's domain.

`python -m qubesim.monitor NOTIFY_FD`, with the boot spec as JSON on stdin, forks the qube's pid 1
into a new pid namespace, records the qube as running once pid 1 reports ready, and when pid 1 ends
(shutdown or kill) throws away the qube's volatile layer and its runtime record.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from qubesim import daemon, guest_init, linux
from qubesim.layout import current


def _wait_for_ready(read_end: int) -> str:
    with os.fdopen(read_end, "rb") as ready:
        return ready.read().decode(errors="replace").strip()


def main(notify_fd: int) -> int:
    spec = guest_init.BootSpec(**json.load(sys.stdin))
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    layout = current()
    shutil.rmtree(spec.volatile, ignore_errors=True)
    linux.unshare(linux.CLONE_NEWPID)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.close(notify_fd)
        guest_init.run(spec, write_end)
    os.close(write_end)
    answer = _wait_for_ready(read_end)
    record = layout.runtime_record(spec.name)
    if daemon.is_ready(answer):
        temporary = record.with_suffix(".tmp")
        temporary.write_text(
            json.dumps(
                {"pid": pid, "start_time": linux.process_start_time(pid), "monitor": os.getpid()}
            )
        )
        os.replace(temporary, record)
    if daemon.is_ready(answer):
        daemon.notify_ready(notify_fd)
    else:
        daemon.notify(notify_fd, answer)
    os.waitpid(pid, 0)
    record.unlink(missing_ok=True)
    shutil.rmtree(spec.volatile, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(spec.mountpoint).rmdir()
    return 0 if daemon.is_ready(answer) else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
