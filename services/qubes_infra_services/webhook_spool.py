# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The webhook spool: accepted events on disk until the worker has delivered them to every qube.

One file per event, written under a temporary name, fsync'ed and renamed (then the folder
fsync'ed) before the receiver answers, so an event GitHub was told about survives a crash or a
restart of the qube. A build trigger is named after its component, so a second push of a
component whose trigger is still pending is folded into it (coalescing). The receiver's part of
the spool (its top folder, "incoming") is bounded in events and bytes: past them it answers 503.

The worker empties "incoming" at once: it links each event into one queue per build qube
(`queues/QUBE/`, hard links: no copy) and then removes it from "incoming", so that what a qube
has not taken yet never counts against the receiver's bounds: one slow qube's backlog cannot
make GitHub get 503. Each queue is bounded on its own (`queue_max_events` pending events, plus
the one being delivered): a trigger already pending in a queue takes a new push of its component
in; past the bound the queue's oldest pending event is dropped (the caller logs it), that qube's
and no other's. A qube's queue moves the event it delivers to its `active/` folder and removes it
once delivered; what is left in `active/` after a crash is delivered again first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

TRIGGER_PREFIX = "trigger-"
COMMAND_PREFIX = "command-"
EVENT_PREFIXES = (TRIGGER_PREFIX, COMMAND_PREFIX)
# Where an earlier worker kept the event it delivered (to every qube at once): moved back to
# "incoming" at start, so an upgrade delivers it again.
LEGACY_ACTIVE = "active"
QUEUES = "queues"
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


def _pending(folder: str) -> list[str]:
    """Event files of folder, oldest first (the receiver's write time, which links share)."""
    found = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(EVENT_PREFIXES) and entry.is_file(follow_symlinks=False):
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
    return [name for _mtime, name in sorted(found)]


def load(path: str, max_bytes: int) -> Event:
    """The event stored at path; anything but an object of strings gets empty content."""
    with open(path, "rb") as stored:
        data = stored.read(max_bytes)
    try:
        content = json.loads(data)
    except ValueError:
        content = None
    if not isinstance(content, dict) or not all(isinstance(v, str) for v in content.values()):
        content = {}
    return Event(os.path.basename(path), path, content)


class Spool:
    def __init__(self, directory: str, max_events: int, max_bytes: int) -> None:
        self.directory = directory
        self.legacy_active = os.path.join(directory, LEGACY_ACTIVE)
        self.queues = os.path.join(directory, QUEUES)
        self.max_events = max_events
        self.max_bytes = max_bytes

    def prepare(self) -> None:
        """The worker's folders; events an earlier worker was delivering go back to incoming."""
        os.makedirs(self.queues, mode=0o700, exist_ok=True)
        os.makedirs(self.legacy_active, mode=0o700, exist_ok=True)
        for name in _pending(self.legacy_active):
            os.rename(os.path.join(self.legacy_active, name), os.path.join(self.directory, name))
        _fsync_folder(self.directory)

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
        """Events and bytes in incoming (the queues of the qubes do not count)."""
        count = size = 0
        for folder in (self.directory, self.legacy_active):
            with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith((*EVENT_PREFIXES, TEMPORARY_PREFIX)):
                        count += 1
                        size += entry.stat(follow_symlinks=False).st_size
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

    def incoming(self) -> list[Event]:
        """The events the receiver accepted and the worker has not handed to the queues yet."""
        return [load(os.path.join(self.directory, name), self.max_bytes)
                for name in _pending(self.directory)]  # fmt: skip

    def handed_over(self, event: Event) -> None:
        """event is in every queue it goes to: it leaves incoming (and the receiver's bounds)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(event.path)
        _fsync_folder(self.directory)

    def queue(self, qube: str, max_events: int) -> Queue:
        return Queue(os.path.join(self.queues, qube), max_events, self.max_bytes)

    def queued_qubes(self) -> list[str]:
        with os.scandir(self.queues) as entries:
            return sorted(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a receiver that died before its rename (never answered 2xx)."""
        limit = time.time() - STALE_TEMPORARY_SECONDS
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name.startswith(TEMPORARY_PREFIX) and entry.stat().st_mtime < limit:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)


class Queue:
    """The events one build qube is owed, oldest first; written by the worker's thread that
    fans events out (offer) and by the qube's own delivery thread (take, done) only."""

    def __init__(self, directory: str, max_events: int, max_bytes: int) -> None:
        self.directory = directory
        self.active = os.path.join(directory, ACTIVE)
        self.max_events = max_events
        self.max_bytes = max_bytes

    def prepare(self) -> None:
        os.makedirs(self.active, mode=0o700, exist_ok=True)

    def pending(self) -> list[str]:
        return _pending(self.directory)

    def offer(self, event: Event) -> tuple[str, list[Event]]:
        """Link event into the queue: (`queued`, `coalesced` into a pending trigger of its
        component, or `present` already; the events dropped to make room, oldest first)."""
        target = os.path.join(self.directory, event.name)
        if event.name.startswith(COMMAND_PREFIX) and os.path.lexists(
            os.path.join(self.active, event.name)
        ):
            return "present", []  # handed over before a crash, being delivered
        if os.path.lexists(target):
            if os.path.samefile(target, event.path):
                return "present", []  # handed over before a crash
            return "coalesced", []
        pending = self.pending()
        excess = max(0, len(pending) + 1 - self.max_events)
        dropped = [load(os.path.join(self.directory, name), self.max_bytes)
                   for name in pending[:excess]]  # fmt: skip
        for old in dropped:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old.path)
        os.link(event.path, target)
        _fsync_folder(self.directory)
        return "queued", dropped

    def take(self) -> Event | None:
        """The next event to deliver, moved to active/ (an interrupted delivery comes first). A
        trigger of its component offered from now on is queued anew: the qube is called after
        the move, so every push accepted before it is covered by this delivery."""
        interrupted = _pending(self.active)
        if interrupted:
            return load(os.path.join(self.active, interrupted[0]), self.max_bytes)
        for name in self.pending():
            os.rename(os.path.join(self.directory, name), os.path.join(self.active, name))
            _fsync_folder(self.active)
            return load(os.path.join(self.active, name), self.max_bytes)
        return None

    def done(self, event: Event) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(event.path)
        _fsync_folder(self.active)

    def remove(self) -> list[Event]:
        """Drop the whole queue (its qube is no longer a build qube); the events it held."""
        held = [
            load(os.path.join(folder, name), self.max_bytes)
            for folder in (self.active, self.directory)
            for name in _pending(folder)
        ]
        shutil.rmtree(self.directory, ignore_errors=True)
        return held
