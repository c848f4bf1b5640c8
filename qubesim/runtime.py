"""Starting, stopping and entering qubes (dom0's side of the simulated hypervisor)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qubesim import cgroup, daemon, linux, template, world
from qubesim.errors import QubesimError
from qubesim.guest_init import BootSpec, dropped_capabilities
from qubesim.layout import Layout
from qubesim.model import ADMIN_VM, Database, State
from qubesim.properties import OWN_ROOT

START_TIMEOUT_SECONDS = 60
# Every qube's systemd, journald, logind and user manager each hold inotify instances, counted
# per user (root) across the machine: the kernel's default of 128 is spent by a few hosts' qubes,
# and a systemd that cannot get one exits while booting (status 255). Container hosts raise it
# likewise (LXD, Incus).
INOTIFY_INSTANCES = 8192
# What of a qube outlives a shutdown, as qubesdb's /qubes-vm-persistence tells the qube.
_PERSISTENCE = {"TemplateVM": "full", "StandaloneVM": "full", "AppVM": "rw-only", "DispVM": "none"}
QREXEC_EXEC = "/usr/lib/qubes/qubesim-exec"
ENTER = str(Path(__file__).with_name("enter.py"))  # how a call's process gets into a qube


def qubesdb_vm_type(state: State, name: str) -> str:
    """What qubesdb's /qubes-vm-type tells a qube it is, which picks the services it runs by
    default (qubes-core-admin, qubes/ext/r3compatibility.py, on_domain_qdb_create)."""
    klass = state.qube(name)["klass"]
    if klass == "TemplateVM":
        return klass
    if state.provides_network(name):
        return "ProxyVM" if state.get_property(name, "netvm") is not None else "NetVM"
    return "AppVM"


class QubeInUse(QubesimError):
    """qubesd's QubesVMInUseError: other running qubes depend on this one."""


class ShutdownTimeout(QubesimError):
    """qubesd's QubesVMShutdownTimeoutError."""


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
    def _record(self, name: str) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self.layout.runtime_record(name).read_text())
        except (OSError, ValueError):
            return None
        return record

    def running(self, name: str) -> Running | None:
        if name == ADMIN_VM:
            return None
        record = self._record(name)
        if record is None or linux.process_start_time(record["pid"]) != record["start_time"]:
            return None  # halted, halting, or gone with a host reboot
        return Running(pid=record["pid"], monitor=record["monitor"])

    def _halting(self, name: str) -> bool:
        """The qube's init has ended and its monitor is still cleaning up (a template's commit)."""
        record = self._record(name)
        return record is not None and linux.process_start_time(record["monitor"]) == record.get(
            "monitor_start_time"
        )

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
        owner = root_owner(state, name)
        with self._qube_lock(name):
            running = self.running(name)
            if running is None:
                self.wait_halted(name, START_TIMEOUT_SECONDS)  # a shutdown still under way
                # The template's snapshots stay while this qube boots on one of them.
                with self._lock(f"{owner}.snapshots", fcntl.LOCK_SH if owner != name else None):
                    running = self._boot(state, name, owner)
        return running

    def _root_of(self, name: str, owner: str) -> str:
        """A qube's own root, or its template's as of the template's last shutdown."""
        if owner == name:
            return str(template.mount(self.layout, name))
        return str(template.snapshot_mount(self.layout, owner))

    def _boot_spec(self, state: State, name: str, owner: str) -> BootSpec:
        record = state.qube(name)
        template_root = self._root_of(name, owner)
        services = {
            key.removeprefix("service."): value
            for key, value in record["features"].items()
            if key.startswith("service.")
        }
        qubesdb = {
            "/name": name,
            "/qubes-vm-type": qubesdb_vm_type(state, name),
            "/qubes-vm-persistence": _PERSISTENCE[record["klass"]],
            "/qubes-vm-updateable": str(state.get_property(name, "updateable")),
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
            cgroup=cgroup.of_qube(self.layout, name),
            outside_hosts=self._outside_hosts(state, name),
        )

    def _outside_hosts(self, state: State, name: str) -> str:
        """The world's names, for a qube that provides network and has no netvm: the one that
        would hold the physical network card and use the outside world's name servers."""
        if not state.provides_network(name) or state.get_property(name, "netvm") is not None:
            return ""
        return world.HOSTS

    def _boot(self, state: State, name: str, owner: str) -> Running:
        linux.raise_sysctl("fs/inotify/max_user_instances", INOTIFY_INSTANCES)
        domain = {
            "boot": dataclasses.asdict(self._boot_spec(state, name, owner)),
            "shutdown_timeout": state.get_property(name, "shutdown_timeout"),
            "root_owner": owner,
        }
        monitor, answer = daemon.spawn(
            self.layout, "qubesim.monitor", name, stdin=json.dumps(domain).encode()
        )
        running = self.running(name)
        if monitor is None or running is None:
            raise QubesimError(answer)
        return running

    # -- template snapshots -----------------------------------------------------------------------
    @contextmanager
    def _lock(self, name: str, operation: int | None = fcntl.LOCK_EX) -> Iterator[None]:
        if operation is None:
            yield
            return
        self.layout.runtime.mkdir(parents=True, exist_ok=True)
        with open(self.layout.qube_lock(name), "a") as lock:
            fcntl.flock(lock, operation)
            yield

    def commit_template(self, name: str) -> None:
        """A halted template's root becomes what its AppVMs start from (Qubes commits a
        template's root volume when it stops)."""
        with self._lock(f"{name}.snapshots"):
            template.commit(self.layout, name)
            self._discard_unused(name)

    def root_is_outdated(self, state: State, name: str) -> bool:
        """A running qube's root is a snapshot of its template older than the template's last
        commit (qubes-core-admin's Volume.is_outdated for a snap_on_start volume: only a running
        qube's snapshot can be behind its source)."""
        owner = root_owner(state, name)
        record = self._record(name)
        if owner == name or record is None or self.running(name) is None:
            return False
        generation = template.committed_generation(self.layout, owner)
        return Path(record["root"]).name != f"{owner}@{generation}"

    def discard_snapshots(self, name: str) -> None:
        """Remove the template's old snapshots that no running AppVM is based on."""
        with self._lock(f"{name}.snapshots"):
            self._discard_unused(name)

    def _discard_unused(self, name: str) -> None:
        in_use = set()
        for record in self.layout.runtime.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                entry = json.loads(record.read_text())
                if linux.process_start_time(entry["pid"]) == entry["start_time"]:
                    in_use.add(Path(entry["root"]))
        template.discard_snapshots(self.layout, name, in_use)

    # -- stop -------------------------------------------------------------------------------------
    def shutdown(self, name: str, *, wait: bool, timeout: float, force: bool = False) -> None:
        """Ask a qube to shut down; refused for a netvm whose clients run, unless forced
        (qubes/vm/mix/net.py on_domain_pre_shutdown)."""
        running = self.running(name)
        if running is None:
            return
        state = self.database.read()
        if not force:
            clients = [client for client in state.clients(name) if self.is_running(client)]
            if state.provides_network(name) and clients:
                raise QubeInUse(f"There are other VMs connected to this VM: {', '.join(clients)}")
        timeout_file = self.layout.shutdown_timeout(name)
        timeout_file.write_text(f"{state.get_property(name, 'shutdown_timeout')}\n")
        _signal(running.monitor, signal.SIGTERM)  # the monitor shuts the qube down as Qubes does
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
        while self.running(name) is not None or self._halting(name):
            if time.monotonic() > deadline:
                raise ShutdownTimeout(f"Domain shutdown timed out: {name!r}")
            time.sleep(0.05)

    # -- enter ------------------------------------------------------------------------------------
    def service_argv(
        self, name: str, running: Running, user: str, service: str, source: str = ADMIN_VM
    ) -> list[str]:
        """The command that runs a qrexec service call in a running qube, as `user`."""
        dropped = dropped_capabilities(self.database.read().network_isolated(name))
        return [
            sys.executable,
            "-S",
            "-I",
            ENTER,
            str(running.pid),
            "/usr/bin/setpriv",
            "--bounding-set=" + ",".join(f"-{cap}" for cap in dropped),
            "--",
            QREXEC_EXEC,
            user,
            source,
            "",
            service,
        ]


def root_owner(state: State, name: str) -> str:
    """The qube whose root volume `name` runs on: its own, its template's, or (a disposable)
    its template's template."""
    while state.qube(name)["klass"] not in OWN_ROOT:
        name = state.get_property(name, "template")
    return name


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
