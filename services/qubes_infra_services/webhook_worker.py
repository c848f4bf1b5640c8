# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The webhook worker: delivers the spooled events to every build qube, each qube on its own.

Every 0.2 s the worker hands the events the receiver accepted to one queue per qube listed in
build-vms.list (see webhook_spool: they then leave the receiver's bounded part of the spool),
and one thread per qube delivers that qube's queue in order, one call at a time, with
qrexec-client-vm: `qubesbuilder.TriggerBuild+COMPONENT` (stdin empty) or
`qubesbuilder.ProcessGithubCommand` (the signed command on stdin). A qube that hangs, fails or
refuses delays its own queue only.

Bounds, per build qube (at most 64 qubes):
- one call at a time, killed after `call_timeout` seconds (120 by default); its output is
  discarded and its exit code logged;
- a call is made again only if it never reached the qube (see `call`): after 1, 2, 4, 8 and
  16 s, 6 attempts in all, all of them within `call_timeout` of the first; a call that reached
  the qube, or ran into that deadline, never is. So one event costs its qube's queue at most
  one `call_timeout`, and costs the other qubes nothing;
- at most `queue_max_events` (200 by default) events wait in the qube's queue, besides the one
  it is being called with; a trigger already waiting takes a new push of its component in, and
  past the bound the queue's oldest event is dropped and logged: a qube that keeps taking its
  calls never loses one.
An event leaves a queue only once its call ended, so a restart of the worker (or of the net
qube) delivers again what was interrupted. One worker runs at a time (a lock in the spool).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from qubes_infra_services import webhook_settings
from qubes_infra_services.definitions import is_component, is_qube_name
from qubes_infra_services.webhook_log import DecisionLog
from qubes_infra_services.webhook_spool import Event, Queue, Spool

# Matched whole (fullmatch): `$` would let a trailing newline through.
MAX_BUILD_VMS = 64
IDLE_SECONDS = 0.2
WORKER_LOCK = ".worker.lock"
MAX_ATTEMPTS = 6
# Waited before the second attempt, doubled before each further one.
RETRY_SECONDS = 1.0
REACHED = b"r"
# The local program of every call (qrexec-client-vm's LOCAL_PROGRAM): it tells the worker that
# it runs, on qrexec-client-vm's own stdout, then passes qrexec-client-vm's own stdin (the
# signed command, or nothing) to the service. The service's stdout is its stdin, and ignored.
LOCAL_PROGRAM = """\
import os, sys
os.write(int(os.environ["SAVED_FD_1"]), b"r")
with os.fdopen(int(os.environ["SAVED_FD_0"]), "rb") as given:
    try:
        sys.stdout.buffer.write(given.read())
    except BrokenPipeError:
        pass
"""


@dataclass(frozen=True)
class Call:
    code: str  # the exit code, `timeout`, or -N for a signal
    reached: bool


class Running:
    """The calls in progress, so that a stopping worker ends them (their own sessions)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.processes: set[subprocess.Popen[bytes]] = set()

    def add(self, process: subprocess.Popen[bytes]) -> None:
        with self.lock:
            self.processes.add(process)

    def discard(self, process: subprocess.Popen[bytes]) -> None:
        with self.lock:
            self.processes.discard(process)

    def kill_all(self) -> None:
        with self.lock:
            for process in self.processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def build_vms(path: str, log: DecisionLog) -> list[str]:
    """Qube names of build-vms.list, one a line; anything else is logged and left out."""
    try:
        with open(path, encoding="ascii", errors="replace") as listed:
            lines = [line.strip() for line in listed.read(64 * 1024).splitlines()]
    except FileNotFoundError:
        lines = []
    names = [line for line in lines if is_qube_name(line)]
    if len(names) != len([line for line in lines if line]):
        log.write(worker="list", decision="skipped", reason=f"invalid lines in {path}")
    return list(dict.fromkeys(names))[:MAX_BUILD_VMS]


def call(settings: webhook_settings.Settings, vm: str, service: str, stdin: bytes,
         timeout: float, running: Running) -> Call:  # fmt: skip
    """Call service in vm, killed after timeout seconds.

    Whether the call reached the qube cannot be read from the exit code: qrexec-client-vm exits
    126 (QREXEC_EXIT_REQUEST_REFUSED) when dom0 refused the call, but with the service's own
    exit code, which may be 126 too, when it ran (core-qrexec, release4.2 and release4.3:
    agent/qrexec-client-vm.c, main(): the agent's socket closed before the data channel's
    address came is "Request refused", exit 126; otherwise handle_data_client() returns the
    remote exit code; and the service's stderr is written to ours, so not that either). But
    main() starts a LOCAL_PROGRAM only once that address came, i.e. once dom0 allowed the call
    and the qube was reached, with our own stdin and stdout as SAVED_FD_0 and SAVED_FD_1: the
    local program writes a byte there, which the service cannot reach.
    """
    command_read, command_write = os.pipe()
    mark_read, mark_write = os.pipe()
    # Each descriptor is closed once only: a number closed twice may by then be another
    # thread's (another call's pipe, the log).
    try:
        # At most max_command_bytes (8 KiB): it fits the pipe, no writer thread needed.
        os.write(command_write, stdin)
    finally:
        os.close(command_write)
    try:
        process = start(settings, vm, service, command_read, mark_write)
    finally:
        os.close(command_read)
        os.close(mark_write)
    try:
        if process is None:  # no qrexec-client-vm: tried again as a refusal is
            return Call("error", reached=False)
        code = wait(process, timeout, running)
        os.set_blocking(mark_read, False)
        try:
            reached = os.read(mark_read, 1) == REACHED
        except BlockingIOError:
            reached = False
        return Call(code, reached)
    finally:
        os.close(mark_read)


def start(settings: webhook_settings.Settings, vm: str, service: str, stdin: int,
          stdout: int) -> subprocess.Popen[bytes] | None:  # fmt: skip
    program = [sys.executable, "-I", "-S", "-c", LOCAL_PROGRAM]
    try:
        return subprocess.Popen(
            [settings.qrexec_client, "--", vm, service, *program],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError:
        return None


def wait(process: subprocess.Popen[bytes], timeout: float, running: Running) -> str:
    """The exit code, or `timeout` (the call's processes then killed)."""
    running.add(process)
    try:
        return str(process.wait(timeout))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timeout"
    finally:
        running.discard(process)


def well_formed(content: dict[str, str], max_command_bytes: int) -> bool:
    if content.get("kind") == "trigger":
        return is_component(content.get("component", ""))
    command = content.get("command", "")
    return (content.get("kind") == "command" and command.isascii()
            and 0 < len(command) <= max_command_bytes)  # fmt: skip


def service_of(content: dict[str, str]) -> tuple[str, bytes]:
    if content["kind"] == "trigger":
        return "qubesbuilder.TriggerBuild+" + content["component"], b""
    return "qubesbuilder.ProcessGithubCommand", content["command"].encode("ascii")


class QubeDelivery:
    """One build qube's queue, delivered in order by a thread of its own."""

    def __init__(
        self,
        settings: webhook_settings.Settings,
        vm: str,
        queue: Queue,
        log: DecisionLog,
        stopping: threading.Event,
        running: Running,
    ) -> None:
        self.settings = settings
        self.vm = vm
        self.queue = queue
        self.log = log
        self.stopping = stopping
        self.running = running
        self.wake = threading.Event()  # something was queued
        self.leave = threading.Event()  # the qube is no longer listed
        self.thread = threading.Thread(target=self.run, name=vm, daemon=True)

    def run(self) -> None:
        while not (self.stopping.is_set() or self.leave.is_set()):
            try:
                busy = self.step()
            except OSError as error:
                self.log.write(worker="queue", qube=self.vm, decision="error", reason=str(error))
                busy = False
            if not busy:
                self.wake.wait(IDLE_SECONDS)
                self.wake.clear()

    def step(self) -> bool:
        """Deliver the queue's next event; False when there was none."""
        event = self.queue.take()
        if event is None:
            return False
        if not well_formed(event.content, self.settings.max_command_bytes):
            self.log.write(worker="queue", qube=self.vm, decision="dropped",
                           reason=f"unknown event {event.name}")  # fmt: skip
        elif not self.deliver(event):
            return False  # stopping: the event stays, to be delivered again
        self.queue.done(event)
        return True

    def deliver(self, event: Event) -> bool:
        """Call the qube until a call reached it, the attempts are spent or call_timeout has
        passed since the first (all attempts together: the event's cost to this queue); False
        if the worker stops before."""
        service, stdin = service_of(event.content)
        end = time.monotonic() + self.settings.call_timeout
        for attempt in range(1, MAX_ATTEMPTS + 1):
            result = call(self.settings, self.vm, service, stdin, end - time.monotonic(),
                          self.running)  # fmt: skip
            wait = RETRY_SECONDS * 2 ** (attempt - 1)
            retry = (not result.reached and result.code != "timeout" and attempt < MAX_ATTEMPTS
                     and time.monotonic() + wait < end)  # fmt: skip
            self.log.write(
                worker="delivery",
                qube=self.vm,
                delivery=event.content.get("delivery", ""),
                service=service,
                component=event.content.get("component", ""),
                attempt=str(attempt),
                decision="delivered" if result.reached else "retrying" if retry else "gave-up",
                reason=f"{self.vm}:{result.code}"
                + ("" if result.reached else " (did not reach the qube)")
                + (f", again in {wait:g} s" if retry else ""),
            )
            if not retry:
                return True
            if self.stopping.wait(wait):
                return False
        return True


class Worker:
    def __init__(self, settings: webhook_settings.Settings, spool: Spool,
                 log: DecisionLog) -> None:  # fmt: skip
        self.settings = settings
        self.spool = spool
        self.log = log
        self.stopping = threading.Event()
        self.running = Running()
        self.deliveries: dict[str, QubeDelivery] = {}

    def queue(self, vm: str) -> Queue:
        queue = self.spool.queue(vm, self.settings.queue_max_events)
        queue.prepare()
        return queue

    def log_queued(self, vm: str, event: Event, decision: str, reason: str) -> None:
        """One line for what a qube's queue did with an event (coalesced, dropped)."""
        self.log.write(
            worker="queue",
            qube=vm,
            delivery=event.content.get("delivery", ""),
            component=event.content.get("component", ""),
            decision=decision,
            reason=reason,
        )

    def fan_out(self, vms: list[str]) -> None:
        """Hand every accepted event to the queue of each listed qube; with no qube listed
        they wait (the receiver answers 503 once its part of the spool is full)."""
        if not vms:
            return
        for event in self.spool.incoming():
            if not well_formed(event.content, self.settings.max_command_bytes):
                reason = f"unknown event {event.name}"
                self.log.write(worker="spool", decision="dropped", reason=reason)
                self.spool.handed_over(event)
                continue
            for vm in vms:
                outcome, dropped = self.queue(vm).offer(event)
                if outcome == "coalesced":
                    reason = "a trigger of this component waits for this qube"
                    self.log_queued(vm, event, "coalesced", reason)
                for old in dropped:
                    reason = (f"the queue of {vm} holds {self.settings.queue_max_events} "
                              "events: its oldest one is dropped")  # fmt: skip
                    self.log_queued(vm, old, "dropped", reason)
                if outcome == "queued" and vm in self.deliveries:
                    self.deliveries[vm].wake.set()
            self.spool.handed_over(event)

    def tend(self, vms: list[str]) -> None:
        """A delivery thread per listed qube; the queue of a qube no longer listed goes, once
        its thread has ended its call."""
        for vm in vms:
            delivery = self.deliveries.get(vm)
            if delivery is None or not delivery.thread.is_alive():
                delivery = QubeDelivery(self.settings, vm, self.queue(vm), self.log,
                                        self.stopping, self.running)  # fmt: skip
                self.deliveries[vm] = delivery
                delivery.thread.start()
        if not vms:
            return  # an empty or missing list drops nothing
        for vm in [vm for vm in self.deliveries if vm not in vms]:
            self.deliveries[vm].leave.set()
            if not self.deliveries[vm].thread.is_alive():
                del self.deliveries[vm]
        for vm in self.spool.queued_qubes():
            if vm not in vms and vm not in self.deliveries:
                for old in self.spool.queue(vm, self.settings.queue_max_events).remove():
                    delivery = old.content.get("delivery", "")
                    self.log.write(worker="queue", qube=vm, delivery=delivery,
                                   decision="dropped", reason="no longer a build qube")  # fmt: skip

    def stop(self) -> None:
        self.stopping.set()
        self.running.kill_all()


def bound_service_logs(settings: webhook_settings.Settings) -> None:
    """The services append (O_APPEND) to their logs, which they keep open: a log too large is
    copied aside and emptied in place."""
    for path in settings.service_logs:
        with contextlib.suppress(FileNotFoundError):
            if os.path.getsize(path) > settings.log_max_bytes:
                shutil.copyfile(path, path + ".1")
                os.truncate(path, 0)


def main() -> int:
    settings = webhook_settings.load()
    spool = Spool(settings.spool_directory, settings.spool_max_events, settings.spool_max_bytes)
    log = DecisionLog(settings.log_file, settings.log_max_bytes)
    lock = os.open(os.path.join(settings.spool_directory, WORKER_LOCK), os.O_RDWR | os.O_CREAT,
                   0o600)  # fmt: skip
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another worker runs
    os.ftruncate(lock, 0)
    os.write(lock, f"{os.getpid()}\n".encode("ascii"))
    spool.prepare()
    worker = Worker(settings, spool, log)

    def stop(*_: object) -> NoReturn:
        worker.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        bound_service_logs(settings)
        spool.remove_stale_temporaries()
        vms = build_vms(settings.build_vms_list, log)
        worker.tend(vms)
        try:
            worker.fan_out(vms)
        except OSError as error:
            log.write(worker="spool", decision="error", reason=str(error))
        time.sleep(IDLE_SECONDS)
