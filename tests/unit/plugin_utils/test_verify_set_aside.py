"""verify.yml's row of the logs the logs repository refused (set aside by the build_logs
role): none is a pass; any is a failure that names the first and points at what to do."""

from __future__ import annotations

from ansible_collections.qubes_infra.build.plugins.plugin_utils.verify_report import (
    MAX_SHOWN,
    logs_rows,
)


def set_aside(found: str) -> tuple[bool, str]:
    rows = logs_rows("build-logs", {"set_aside": found}, {"logs_key": ""})
    (row,) = [row for row in rows if row.check == "set-aside logs"]
    assert row.qube == "build-logs"
    return row.ok, row.detail


def test_no_set_aside_log_passes() -> None:
    assert set_aside("") == (True, "none")
    assert set_aside("\n") == (True, "none")


def test_a_set_aside_log_fails_with_its_name_and_what_to_do() -> None:
    ok, detail = set_aside("build-fedora/log_2026-12-03_20-10-00.xz\nbuild-kernel/x/log_2\n")
    assert not ok
    assert detail.startswith("2 refused by the logs repository, kept in .set-aside/")
    assert "build-fedora/log_2026-12-03_20-10-00.xz" in detail
    assert "'A set-aside log' in the build_logs role's README" in detail


def test_a_hostile_name_stays_on_its_row_bounded() -> None:
    ok, detail = set_aside("\x1b[2J" + "y" * 10_000 + "\nsecond\n")
    assert not ok and "\x1b" not in detail and "\n" not in detail
    assert len(detail) < 2 * MAX_SHOWN + 120
