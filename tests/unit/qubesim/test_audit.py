"""The audit log on a temporary host: decisions and ends written apart, read as one entry a call."""

from __future__ import annotations

import json
from pathlib import Path

from qubesim import audit
from qubesim.layout import Layout


def _decision(call: str, decision: str = "allow") -> audit.Decision:
    return audit.Decision(
        call=call,
        time=audit.now(),
        source="build-fedora",
        target="dom0",
        actual_target="keys-fedora" if decision == "allow" else "",
        service="qubesbuilder.LogReceived",
        argument="build-fedora",
        decision=decision,
        rule="/etc/qubes/policy.d/20-build.policy:3",
        reason="",
    )


def test_a_call_is_running_until_its_end_is_written(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    audit.record(layout, decision=_decision("a"))
    [running] = audit.read(layout)
    assert (running["call"], running["exit_code"], running["end_time"]) == ("a", None, None)
    assert audit.format_entry(running).endswith(
        " build-fedora -> dom0->keys-fedora qubesbuilder.LogReceived+build-fedora allow"
        " /etc/qubes/policy.d/20-build.policy:3 exit=running"
    )
    audit.record(layout, end=audit.End(call="a", time=audit.now(), exit_code=0))
    [ended] = audit.read(layout)
    assert ended["exit_code"] == 0 and ended["end_time"] is not None
    assert audit.format_entry(ended).endswith(" exit=0")


def test_calls_are_read_in_the_order_of_their_decisions_with_their_own_ends(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    audit.record(layout, decision=_decision("first"))
    denied = _decision("second", "deny")
    audit.record(layout, decision=denied, end=audit.End("second", denied.time, 126))
    audit.record(layout, end=audit.End(call="first", time=audit.now(), exit_code=3))
    entries = list(audit.read(layout))
    assert [(e["call"], e["decision"], e["exit_code"]) for e in entries] == [
        ("first", "allow", 3),
        ("second", "deny", 126),
    ]
    assert entries[1]["end_time"] == entries[1]["time"]
    lines = layout.audit_log.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["decision", "decision", "end", "end"]


def test_a_log_of_whole_calls_written_before_is_still_read(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.logs.mkdir()
    whole = {**vars(_decision("x")), "exit_code": 0}
    del whole["call"]
    layout.audit_log.write_text(json.dumps(whole) + "\n")
    [entry] = audit.read(layout)
    assert (entry["exit_code"], entry["service"]) == (0, "qubesbuilder.LogReceived")
