"""The qrexec audit log, which tests read to assert the flows.

As Qubes logs a call's policy decision when it is made (qubes-core-qrexec,
qrexec/tools/qrexec_policy_exec.py: LogAllowedResolution.execute logs "allowed to" before the
service runs, handle_request logs "denied"), a call is written twice, one JSON line each: its
decision when it is made and its end (exit code) when it ends, joined by the call's id. A running
call is one whose end is not written yet. `read` joins the two into one entry per call.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from qubesim.layout import Layout

DECISION = "decision"
END = "end"


@dataclass(frozen=True)
class Decision:
    call: str  # the call's id, repeated by its end
    time: str
    source: str
    target: str  # as requested by the caller
    actual_target: str  # after redirects; empty when denied
    service: str
    argument: str
    decision: str  # allow | deny
    rule: str  # FILE:LINE of the deciding rule; empty for calls from dom0 (no policy) or no match
    reason: str


@dataclass(frozen=True)
class End:
    call: str
    time: str
    exit_code: int
    error: str = ""  # why an allowed call could not run (its target did not start)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_call_id() -> str:
    return uuid.uuid4().hex


def _line(kind: str, event: Decision | End) -> bytes:
    return (json.dumps({"event": kind, **asdict(event)}, sort_keys=True) + "\n").encode()


def record(layout: Layout, decision: Decision | None = None, end: End | None = None) -> None:
    """Append a decision, an end, or both (a call refused at once) in one write."""
    data = (_line(DECISION, decision) if decision else b"") + (_line(END, end) if end else b"")
    layout.logs.mkdir(parents=True, exist_ok=True)
    # One write with O_APPEND: concurrent calls never interleave within a line.
    fd = os.open(layout.audit_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _entry(decision: dict[str, object]) -> dict[str, object]:
    """A call as read: its decision, and no end yet."""
    entry = {key: value for key, value in decision.items() if key != "event"}
    entry.update(exit_code=None, end_time=None, error="")
    return entry


def _joined(lines: list[str]) -> list[dict[str, object]]:
    """One entry per call, in the order of their decisions."""
    calls: dict[str, dict[str, object]] = {}
    entries: list[dict[str, object]] = []
    for line in lines:
        event = json.loads(line)
        kind = event.get("event")
        if kind == DECISION:
            entry = _entry(event)
            calls[str(event["call"])] = entry
            entries.append(entry)
        elif kind == END:
            ended = calls.get(str(event["call"]))
            if ended is not None:
                ended.update(
                    exit_code=event["exit_code"],
                    end_time=event["time"],
                    error=event.get("error", ""),
                )
        else:  # a whole call, as a log written before decisions were recorded apart holds it
            entries.append({"call": "", "end_time": event.get("time"), "error": "", **event})
    return entries


def read(layout: Layout, since: datetime | None = None) -> Iterator[dict[str, object]]:
    """Every call decided at or after `since`: its decision, with `exit_code` and `end_time`
    None while it runs."""
    try:
        lines = layout.audit_log.read_text().splitlines()
    except FileNotFoundError:
        return
    for entry in _joined(lines):
        if since is None or datetime.fromisoformat(str(entry["time"])) >= since:
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
    code = "running" if entry["exit_code"] is None else entry["exit_code"]
    return (
        f"{entry['time']} {entry['source']} -> {target} {entry['service']}{argument}"
        f" {entry['decision']} {rule} exit={code}"
    )
