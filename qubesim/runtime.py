"""Starting, stopping and entering qubes (dom0's side of the simulated hypervisor)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

from qubesim import daemon, linux, template
from qubesim.errors import QubesimError
from qubesim.guest_init import BootSpec, dropped_capabilities
from qubesim.layout import Layout
from qubesim.model import ADMIN_VM, Database, State

START_TIMEOUT_SECONDS = 60
QREXEC_EXEC = "/usr/lib/qubes/qubesim-exec"


@dataclasses.dataclass(frozen=True)
class Running:
    """A running qube: the host pid of its pid 1, which commands enter."""

    pid: int
    monitor: int


class Runtime:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.database = Database(layout)

    # -- state ------------------------------------------------------------------------------------
    def running(self, name: str) -> Running | None:
        if name == ADMIN_VM:
            return None
        try:
            record = json.loads(self.layout.runtime_record(name).read_text())
        except (OSError, ValueError):
            return None
        if linux.process_start_time(record["pid"]) != record["start_time"]:
            return None  # the host rebooted, or the qube died without its monitor noticing
        return Running(pid=record["pid"], monitor=record["monitor"])

    def is_running(self, name: str) -> bool:
        return name == ADMIN_VM or self.running(name) is not None

    def power_state(self, name: str) -> str:
        return "Running" if self.is_running(name) else "Halted"

    @contextmanager
    def _qube_lock(self, name: str) -> Iterator[None]:
        self.layout.runtime.mkdir(parents=True, exist_ok=True)
        with open(self.layout.qube_lock(name), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- start ------------------------------------------------------------------------------------
    def start(self, name: str) -> Running:
        """Start a qube (and its netvm first, as Qubes does); return it if it already runs."""
        state = self.database.read()
        record = state.qube(name)
        if record["klass"] == "AdminVM":
            raise QubesimError(f"{name} cannot be started: it is the admin qube")
        netvm = state.get_property(name, "netvm")
        if netvm:
            self.start(netvm)
        daemon.ensure_qrexec(self.layout)
        with self._qube_lock(name):
            running = self.running(name)
            if running is None:
                running = self._boot(self._boot_spec(state, name))
        return running

    def _boot_spec(self, state: State, name: str) -> BootSpec:
        record = state.qube(name)
        template_name = (
            name if record["klass"] == "TemplateVM" else state.get_property(name, "template")
        )
        template_root = template.mount(self.layout, template_name)
        services = {
            key.removeprefix("service."): value
            for key, value in record["features"].items()
            if key.startswith("service.")
        }
        qubesdb = {
            "/name": name,
            "/qubes-vm-type": record["klass"],
            "/qubes-vm-persistence": "full" if record["klass"] == "TemplateVM" else "rw-only",
            "/qubes-vm-updateable": str(record["klass"] == "TemplateVM"),
            "/default-user": state.get_property(name, "default_user"),
            **{
                f"/qubes-service/{service}": "1" if value else "0"
                for service, value in services.items()
            },
        }
        return BootSpec(
            name=name,
            klass=record["klass"],
            template_root=str(template_root),
            mountpoint=str(self.layout.root_mount(name)),
            private=str(self.layout.private(name)),
            volatile=str(self.layout.volatile(name)),
            qrexec_dir=str(self.layout.qrexec_socket_dir),
            isolated_network=state.network_isolated(name),
            qubesdb=qubesdb,
            services=sorted(service for service, value in services.items() if value),
        )

    def _boot(self, spec: BootSpec) -> Running:
        spec_json = json.dumps(dataclasses.asdict(spec)).encode()
        monitor, answer = daemon.spawn(self.layout, "qubesim.monitor", spec.name, stdin=spec_json)
        running = self.running(spec.name)
        if monitor is None or running is None:
            raise QubesimError(answer)
        return running

    # -- stop -------------------------------------------------------------------------------------
    def shutdown(self, name: str, *, wait: bool, timeout: float) -> None:
        running = self.running(name)
        if running is None:
            return
        _signal(running.pid, signal.SIGTERM)
        if wait:
            self.wait_halted(name, timeout)

    def kill(self, name: str) -> None:
        running = self.running(name)
        if running is None:
            return
        _signal(running.pid, signal.SIGKILL)
        self.wait_halted(name, START_TIMEOUT_SECONDS)

    def wait_halted(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.layout.runtime_record(name).exists() and self.running(name) is not None:
            if time.monotonic() > deadline:
                raise QubesimError(f"{name}: shutdown timed out after {timeout:g} seconds")
            time.sleep(0.05)

    # -- enter ------------------------------------------------------------------------------------
    def service_argv(
        self, name: str, running: Running, user: str, service: str, source: str = ADMIN_VM
    ) -> list[str]:
        """The command that runs a qrexec service call in a running qube, as `user`."""
        dropped = dropped_capabilities(self.database.read().network_isolated(name))
        return [
            "nsenter",
            f"--target={running.pid}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--root",
            "--wd",
            "--",
            "setpriv",
            "--bounding-set=" + ",".join(f"-{cap}" for cap in dropped),
            "--",
            QREXEC_EXEC,
            user,
            source,
            "",
            service,
        ]


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
