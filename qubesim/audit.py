"""The qrexec audit log: one JSON line per call, which tests read to assert the flows."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from qubesim.layout import Layout


@dataclass(frozen=True)
class Entry:
    time: str
    source: str
    target: str  # as requested by the caller
    actual_target: str  # after redirects; empty when denied
    service: str
    argument: str
    decision: str  # allow | deny
    rule: str  # FILE:LINE of the deciding rule; empty for calls from dom0 (no policy) or no match
    reason: str
    exit_code: int


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def record(layout: Layout, entry: Entry) -> None:
    line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
    layout.logs.mkdir(parents=True, exist_ok=True)
    # One write with O_APPEND: concurrent calls never interleave within a line.
    fd = os.open(layout.audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read(layout: Layout, since: datetime | None = None) -> Iterator[dict[str, object]]:
    try:
        lines = layout.audit_log.read_text().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        entry = json.loads(line)
        if since is None or datetime.fromisoformat(entry["time"]) >= since:
            yield entry


def parse_since(text: str) -> datetime:
    """An ISO 8601 time (naive means UTC) or seconds since the epoch."""
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_entry(entry: dict[str, object]) -> str:
    argument = f"+{entry['argument']}" if entry["argument"] else ""
    target = entry["target"]
    if entry["actual_target"] and entry["actual_target"] != target:
        target = f"{target}->{entry['actual_target']}"
    rule = entry["rule"] or "-"
    return (
        f"{entry['time']} {entry['source']} -> {target} {entry['service']}{argument}"
        f" {entry['decision']} {rule} exit={entry['exit_code']}"
    )
