"""The process that stands for a running qube on the host, like a hypervisor's domain.

`python -m qubesim.monitor NOTIFY_FD`, with the domain's description as JSON on stdin, forks the
qube's pid 1 into a new pid namespace (pid 1 assembles the qube and becomes systemd), records the
qube as running once the qube's qrexec agent is up, and asks the qube to shut down on SIGTERM, as
Qubes does (systemd's own poweroff, then a kill past the qube's shutdown_timeout). When pid 1 ends
(shutdown or kill) it throws away the qube's volatile layer, its cgroup and its runtime record;
a template's root is then committed for the AppVMs started after it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from qubesim import cgroup, daemon, guest_init, linux
from qubesim.errors import QubesimError
from qubesim.layout import Layout, current
from qubesim.runtime import START_TIMEOUT_SECONDS, Runtime

# systemd's poweroff request in a container (systemd(1), "SIGRTMIN+4"); pid 1 ignores SIGTERM.
POWEROFF = signal.SIGRTMIN + 4


def _read_failure(read_end: int) -> str:
    """What pid 1 said before exec'ing systemd: nothing when the exec succeeded."""
    with os.fdopen(read_end, "rb") as told:
        return told.read().decode(errors="replace").strip()


def _wait_for_agent(spec: guest_init.BootSpec, pid: int) -> str:
    """`ready` once the qube's agent is up, or why the qube did not come up."""
    started = Path(f"/proc/{pid}/root", guest_init.AGENT_STARTED)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        # Without following links: an absolute link in the qube's root would be resolved in
        # dom0's, and tell the qube whether a dom0 path exists.
        if os.path.lexists(started):
            return daemon.READY
        if linux.process_start_time(pid) is None or _is_zombie(pid):
            return f"cannot start {spec.name}: its init ended while booting ({_ended(pid)})"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return f"cannot start {spec.name}: its qrexec agent did not start in {START_TIMEOUT_SECONDS} s"


def _ended(pid: int) -> str:
    """How the qube's pid 1 ended (it is reaped here)."""
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        return stat[stat.rindex(b")") + 2 :].startswith(b"Z")
    return True


def _handle_shutdown(pid: int, timeout: float, current: Path) -> None:
    """On SIGTERM (qvm-shutdown): systemd's poweroff, and SIGKILL once shutdown_timeout is past,
    the qube's property as it is at the shutdown (`current`, written by whoever asked for it),
    else as it was at the start."""

    def kill(_signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def shut_down(_signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, POWEROFF)
        seconds = timeout
        with contextlib.suppress(OSError, ValueError):
            seconds = float(current.read_text())
        signal.signal(signal.SIGALRM, kill)
        signal.alarm(max(1, math.ceil(seconds)))

    signal.signal(signal.SIGTERM, shut_down)


def _record_running(layout: Layout, spec: guest_init.BootSpec, pid: int) -> Path:
    record = layout.runtime_record(spec.name)
    temporary = record.with_suffix(".tmp")
    temporary.write_text(
        json.dumps(
            {
                "pid": pid,
                "start_time": linux.process_start_time(pid),
                "monitor": os.getpid(),
                "monitor_start_time": linux.process_start_time(os.getpid()),
                "root": spec.template_root,
            }
        )
    )
    os.replace(temporary, record)
    return record


def _clean_up(layout: Layout, spec: guest_init.BootSpec, root_owner: str) -> None:
    """Throw away what the qube leaves; the qube counts as halted only once its record goes, so
    that a template's commit is done before any AppVM can start after the template's shutdown."""
    shutil.rmtree(spec.volatile, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(spec.mountpoint).rmdir()
    with contextlib.suppress(QubesimError):
        cgroup.remove(spec.cgroup)
    runtime = Runtime(layout)
    if spec.klass == "TemplateVM":
        runtime.commit_template(spec.name)
    elif not spec.owns_root:
        runtime.discard_snapshots(root_owner)
    layout.shutdown_timeout(spec.name).unlink(missing_ok=True)
    layout.runtime_record(spec.name).unlink(missing_ok=True)


def main(notify_fd: int) -> int:
    domain = json.load(sys.stdin)
    spec = guest_init.BootSpec(**domain["boot"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    layout = current()
    shutil.rmtree(spec.volatile, ignore_errors=True)
    try:
        cgroup.prepare(spec.cgroup)
    except QubesimError as error:
        daemon.notify(notify_fd, f"cannot start {spec.name}: {error}")
        return 1
    # The qube's pid namespace is for its pid 1 only: the monitor's own children (the clean-up's
    # programs) go back to the host's once the qube has ended (a dead namespace takes none).
    host_pids = os.open("/proc/self/ns/pid", os.O_RDONLY)
    linux.unshare(linux.CLONE_NEWPID)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.close(notify_fd)
        guest_init.run(spec, write_end)
    os.close(write_end)
    _handle_shutdown(pid, float(domain["shutdown_timeout"]), layout.shutdown_timeout(spec.name))
    answer = _read_failure(read_end) or _wait_for_agent(spec, pid)
    if daemon.is_ready(answer):
        _record_running(layout, spec, pid)
        daemon.notify_ready(notify_fd)
    else:
        daemon.notify(notify_fd, answer)
    with contextlib.suppress(ChildProcessError):  # reaped already when it ended while booting
        os.waitpid(pid, 0)
    signal.alarm(0)
    linux.setns(host_pids, linux.CLONE_NEWPID)
    _clean_up(layout, spec, domain["root_owner"])
    return 0 if daemon.is_ready(answer) else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
