# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The webhook worker: delivers the spooled events to every build qube, one event at a time.

For each event it calls every qube listed in build-vms.list at once, with qrexec-client-vm:
`qubesbuilder.TriggerBuild+COMPONENT` (stdin empty) or `qubesbuilder.ProcessGithubCommand` (the
signed command on stdin); each call has a deadline, its output is discarded and its exit code
logged. The event leaves the spool only after every call ended, so a restart delivers again
what was interrupted; a call that did not reach its qube is made again a few times. One worker
runs at a time (a lock in the spool).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import webhook_settings
from webhook_log import DecisionLog
from webhook_spool import Event, Spool

QUBE_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_-]{0,30}$")
COMPONENT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_BUILD_VMS = 64
IDLE_SECONDS = 0.2
WORKER_LOCK = ".worker.lock"
# Calls that did not reach a build qube are made again, after 1, 2, ... seconds, this many times
# in all: the worker waits for a qube that restarts, not for one that stays away.
MAX_ATTEMPTS = 6
RETRY_SECONDS = 1


def build_vms(path: str, log: DecisionLog) -> list[str]:
    """Qube names of build-vms.list, one a line; anything else is logged and left out."""
    try:
        with open(path, encoding="ascii", errors="replace") as listed:
            lines = [line.strip() for line in listed.read(64 * 1024).splitlines()]
    except FileNotFoundError:
        lines = []
    names = [line for line in lines if QUBE_NAME.match(line)]
    if len(names) != len([line for line in lines if line]):
        log.write(worker="list", decision="skipped", reason=f"invalid lines in {path}")
    return names[:MAX_BUILD_VMS]


def call_all(settings: webhook_settings.Settings, vms: list[str], service: str,
             stdin: bytes) -> dict[str, str]:  # fmt: skip
    """Call service in every qube at once; each qube's exit code (or `timeout`)."""
    calls = {}
    for vm in vms:
        calls[vm] = subprocess.Popen(
            [settings.qrexec_client, "--", vm, service],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # The command is at most a few kilobytes: it fits the pipe, no writer thread needed.
        with contextlib.suppress(BrokenPipeError):
            calls[vm].stdin.write(stdin)  # type: ignore[union-attr]
        with contextlib.suppress(BrokenPipeError):
            calls[vm].stdin.close()  # type: ignore[union-attr]
    deadline = time.monotonic() + settings.call_timeout
    results = {}
    for vm, process in calls.items():
        try:
            results[vm] = str(process.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            results[vm] = "timeout"
    return results


def unreached(code: str) -> bool:
    """The call never ran the service: qrexec-client-vm's 126 (refused, or the connection to
    the qube failed, as while this qube or the build qube shuts down), or a signal (not our
    deadline's) ended it. A service that ran and failed, or hung, is not called again."""
    return code == "126" or code.startswith("-")


def deliver(settings: webhook_settings.Settings, event: Event, log: DecisionLog) -> list[str]:
    """Call every build qube still owed this event; the qubes the call did not reach."""
    content = event.content
    if content.get("kind") == "trigger":
        service, stdin = "qubesbuilder.TriggerBuild+" + content["component"], b""
    else:
        service, stdin = "qubesbuilder.ProcessGithubCommand", content["command"].encode("ascii")
    vms = build_vms(settings.build_vms_list, log)
    if "owed" in content:  # an earlier attempt reached the others
        vms = [vm for vm in vms if vm in content["owed"].split(",")]
    results = call_all(settings, vms, service, stdin)
    missed = [vm for vm, code in results.items() if unreached(code)]
    attempt = int(content.get("attempt", "1"))
    retry = bool(missed) and attempt < MAX_ATTEMPTS
    log.write(
        worker="delivery",
        delivery=content.get("delivery", ""),
        service=service,
        component=content.get("component", ""),
        decision="retrying" if retry else "gave-up" if missed else "delivered",
        reason=" ".join(f"{vm}:{code}" for vm, code in results.items()) or "no build qube",
    )
    return missed if retry else []


def bound_service_logs(settings: webhook_settings.Settings) -> None:
    """The services append (O_APPEND) to their logs, which they keep open: a log too large is
    copied aside and emptied in place."""
    for path in settings.service_logs:
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(path) > settings.log_max_bytes:
                shutil.copyfile(path, path + ".1")
                os.truncate(path, 0)


def well_formed(content: dict[str, str]) -> bool:
    if not content.get("attempt", "1").isdigit():
        return False
    if content.get("kind") == "trigger":
        return COMPONENT.match(content.get("component", "")) is not None
    return content.get("kind") == "command" and content.get("command", "").isascii()


def run_once(settings: webhook_settings.Settings, spool: Spool, log: DecisionLog) -> bool:
    """Deliver the next event; False when there was none."""
    try:
        event = spool.take()
    except (OSError, ValueError) as error:
        log.write(worker="spool", decision="error", reason=str(error))
        return False
    if event is None:
        return False
    if not well_formed(event.content):
        log.write(worker="spool", decision="dropped", reason=f"unknown event {event.name}")
        spool.done(event)
        return True
    missed = deliver(settings, event, log)
    if not missed:
        spool.done(event)
        return True
    attempt = int(event.content.get("attempt", "1"))
    spool.keep(event, {**event.content, "owed": ",".join(missed), "attempt": str(attempt + 1)})
    time.sleep(RETRY_SECONDS * attempt)
    return True


def main() -> int:
    settings = webhook_settings.load()
    spool = Spool(settings.spool_directory, settings.spool_max_events, settings.spool_max_bytes)
    spool.prepare()
    log = DecisionLog(settings.log_file, settings.log_max_bytes)
    lock = os.open(os.path.join(settings.spool_directory, WORKER_LOCK), os.O_RDWR | os.O_CREAT,
                   0o600)  # fmt: skip
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another worker runs
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode("ascii"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        bound_service_logs(settings)
        spool.remove_stale_temporaries()
        while run_once(settings, spool, log):
            pass
        time.sleep(IDLE_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
