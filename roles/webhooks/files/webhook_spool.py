# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The webhook spool: accepted events on disk until the worker has delivered them.

One file per event, written under a temporary name, fsync'ed and renamed (then the folder
fsync'ed) before the receiver answers, so an event GitHub was told about survives a crash or a
restart of the qube. A build trigger is named after its component, so a second push of a
component whose trigger is still pending is folded into it (coalescing). The worker moves an
event to `active/` while it delivers it and removes it afterwards; what is left in `active/`
after a crash is delivered again. The spool is bounded in events and bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass

TRIGGER_PREFIX = "trigger-"
COMMAND_PREFIX = "command-"
ACTIVE = "active"
LOCK = ".lock"
TEMPORARY_PREFIX = ".tmp-"
# A temporary file older than this is what a crash left behind.
STALE_TEMPORARY_SECONDS = 60


class SpoolFull(Exception):
    """The spool holds its maximum of events or bytes."""


@dataclass(frozen=True)
class Event:
    name: str
    path: str
    content: dict[str, str]


def _fsync_folder(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: str, max_events: int, max_bytes: int) -> None:
        self.directory = directory
        self.active = os.path.join(directory, ACTIVE)
        self.max_events = max_events
        self.max_bytes = max_bytes

    def prepare(self) -> None:
        os.makedirs(self.active, mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Receiver processes add events one at a time, so the bounds hold exactly."""
        fd = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _usage(self) -> tuple[int, int]:
        count = size = 0
        for folder in (self.directory, self.active):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith((TRIGGER_PREFIX, COMMAND_PREFIX, TEMPORARY_PREFIX)):
                        count += 1
                        size += entry.stat().st_size
        return count, size

    @staticmethod
    def _write_file(path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, name: str, data: bytes) -> None:
        """data in the spool as `name`, durably, in one atomic step."""
        temporary = os.path.join(self.directory, TEMPORARY_PREFIX + secrets.token_hex(8))
        self._write_file(temporary, data)
        os.rename(temporary, os.path.join(self.directory, name))
        _fsync_folder(self.directory)

    def _add(self, name: str, content: dict[str, str]) -> None:
        data = json.dumps(content, sort_keys=True).encode("ascii")
        count, size = self._usage()
        if count + 1 > self.max_events or size + len(data) > self.max_bytes:
            raise SpoolFull(f"{count} events, {size} bytes")
        self._write(name, data)

    def add_trigger(self, component: str, delivery: str) -> bool:
        """Queue a build trigger of component; False when one is already pending (coalesced)."""
        name = TRIGGER_PREFIX + component
        with self._locked():
            if os.path.lexists(os.path.join(self.directory, name)):
                return False
            self._add(name, {"kind": "trigger", "component": component, "delivery": delivery})
        return True

    def add_command(self, command: str, delivery: str) -> None:
        name = f"{COMMAND_PREFIX}{time.time_ns()}-{secrets.token_hex(4)}"
        with self._locked():
            self._add(name, {"kind": "command", "command": command, "delivery": delivery})

    def _pending(self, folder: str) -> list[str]:
        """Event files of folder, oldest first."""
        found = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and entry.name.startswith((TRIGGER_PREFIX, COMMAND_PREFIX)):
                    found.append((entry.stat().st_mtime_ns, entry.name))
        return [entry[1] for entry in sorted(found)]

    def take(self) -> Event | None:
        """The next event to deliver, moved to active/ (interrupted deliveries come first).
        A trigger arriving for its component from now on is queued anew: the build qubes are
        called after the move, so every push before it is covered by this delivery."""
        interrupted = self._pending(self.active)
        if interrupted:
            return self._load(interrupted[0])
        for name in self._pending(self.directory):
            os.rename(os.path.join(self.directory, name), os.path.join(self.active, name))
            _fsync_folder(self.active)
            return self._load(name)
        return None

    def _load(self, name: str) -> Event:
        path = os.path.join(self.active, name)
        with open(path, "rb") as stored:
            data = stored.read(self.max_bytes)
        try:
            content = json.loads(data)
        except ValueError:
            content = None
        # Anything but an object of strings is not an event the receiver wrote.
        if not isinstance(content, dict) or not all(isinstance(v, str) for v in content.values()):
            content = {}
        return Event(name, path, content)

    def keep(self, event: Event, content: dict[str, str]) -> None:
        """Replace an event being delivered by content (what is still owed), atomically."""
        temporary = os.path.join(self.active, TEMPORARY_PREFIX + secrets.token_hex(8))
        self._write_file(temporary, json.dumps(content, sort_keys=True).encode("ascii"))
        os.rename(temporary, event.path)
        _fsync_folder(self.active)

    def done(self, event: Event) -> None:
        os.unlink(event.path)
        _fsync_folder(self.active)

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a receiver that died before its rename (never answered 2xx)."""
        limit = time.time() - STALE_TEMPORARY_SECONDS
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(TEMPORARY_PREFIX) and entry.stat().st_mtime < limit:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
