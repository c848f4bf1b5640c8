"""Where qubesim keeps the simulated host: one directory tree under $QUBESIM_HOME."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "/var/lib/qubesim"


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def database(self) -> Path:
        return self.home / "qubes.json"

    @property
    def database_lock(self) -> Path:
        return self.home / "qubes.lock"

    @property
    def runtime(self) -> Path:
        """Records of running qubes; stale ones are recognised by their process start time."""
        return self.home / "run"

    @property
    def logs(self) -> Path:
        return self.home / "log"

    @property
    def audit_log(self) -> Path:
        return self.logs / "qrexec-audit.jsonl"

    @property
    def qrexec_socket_dir(self) -> Path:
        """Holds dom0's qrexec socket; mounted read-only into every qube at /run/qubesim."""
        return self.runtime / "qrexec"

    @property
    def dom0(self) -> Path:
        return self.home / "dom0"

    @property
    def dom0_home(self) -> Path:
        """The home of dom0's user (root here): a dom0 is a machine of its own, so what a program
        keeps in its home (Ansible's connection sockets and temporary files, molecule's state)
        is never shared with another simulated host or with this machine."""
        return self.dom0 / "home"

    @property
    def dom0_bin(self) -> Path:
        """The qvm tools, put first on PATH inside `qubesim dom0`."""
        return self.dom0 / "bin"

    def create(self) -> None:
        """Make the tree: private to root, except that dom0's tools may be run (and refuse) by
        anyone, as a real dom0's are."""
        for directory, mode in (
            (self.home, 0o711),
            (self.home / "qubes", 0o700),
            (self.home / "mnt", 0o700),
            (self.runtime, 0o700),
            (self.logs, 0o700),
            (self.dom0, 0o711),
            (self.dom0_bin, 0o755),
            (self.dom0_home, 0o700),
        ):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(mode)

    def qube_dir(self, name: str) -> Path:
        return self.home / "qubes" / name

    def private(self, name: str) -> Path:
        """The private volume: /rw inside the qube, holding /home and /usr/local."""
        return self.qube_dir(name) / "private"

    def root_upper(self, name: str) -> Path:
        """A template's persistent root layer over the host's root."""
        return self.qube_dir(name) / "root"

    def volatile(self, name: str) -> Path:
        """An AppVM's root layer, emptied at every start."""
        return self.qube_dir(name) / "volatile"

    def template_mount(self, name: str) -> Path:
        """Where a template's root is mounted in dom0, shared by the template and its AppVMs."""
        return self.home / "mnt" / name

    def root_mount(self, name: str) -> Path:
        """Where a running qube's root is assembled inside its own mount namespace."""
        return self.qube_dir(name) / "mnt"

    def runtime_record(self, name: str) -> Path:
        return self.runtime / f"{name}.json"

    def shutdown_timeout(self, name: str) -> Path:
        """The qube's shutdown_timeout as it was when its shutdown was asked for."""
        return self.runtime / f"{name}.shutdown-timeout"

    def qube_lock(self, name: str) -> Path:
        return self.runtime / f"{name}.lock"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def current() -> Layout:
    return Layout(Path(os.environ.get("QUBESIM_HOME") or DEFAULT_HOME).absolute())
