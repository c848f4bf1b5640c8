"""How the connection plugin names a failure to reach a qube, which facts it refuses, and which
multiplexer it reuses."""

from __future__ import annotations

import pytest
from ansible_collections.qubes_infra.build.plugins.connection import qubes
from ansible_collections.qubes_infra.build.plugins.connection.qubes import (
    describe_failure,
    planted_variables,
)


@pytest.mark.parametrize(
    ("returncode", "stderr", "autostart", "state", "expected"),
    [
        (2, "qvm-run: error: no such domain: 'x'\n", True, "missing", "qube 'x' does not exist"),
        # A real dom0's qvm-run --no-autostart exits 1 and prints nothing for a halted qube
        # (qubes-core-admin-client, qubesadmin/tools/qvm_run.py, main: a halted qube is skipped
        # with retcode 1, its message printed only with --verbose).
        (1, "", False, "halted", "qube 'x' is not running and autostart is off"),
        (
            1,
            "domain x is not running\n",
            False,
            "halted",
            "qube 'x' is not running and autostart is off",
        ),
        (
            126,
            "Request refused\n",
            True,
            None,
            "qrexec policy refused the shell service to qube 'x'",
        ),
        (
            127,
            "bash: line 1: python3: command not found\n",
            True,
            "running",
            "qube 'x' could not run python3 (it is needed to run tasks)",
        ),
        (
            1,
            "strange \x1b[31mfailure\x07\n",
            True,
            "running",
            "could not reach qube 'x' (exit 1); it said: strange ?[31mfailure?",
        ),
        (
            1,
            "",
            True,
            None,
            "could not reach qube 'x' (exit 1): it may not exist, be halted with autostart off"
            " or be refused by policy",
        ),
    ],
)
def test_failures_are_told_apart(
    returncode: int, stderr: str, autostart: bool, state: str | None, expected: str
) -> None:
    assert describe_failure("x", returncode, stderr, autostart, state) == expected


@pytest.mark.parametrize(
    "stderr",
    [
        "qvm-run: error: no such domain: 'x'\n",
        "domain x is not running\n",
        "Request refused\n",
        "python3: command not found\n",
    ],
)
def test_what_a_running_qube_writes_does_not_choose_the_reason(stderr: str) -> None:
    """stderr comes from the qube too: it is quoted, never taken as the verdict."""
    reason = describe_failure("x", 1, stderr, False, "running")
    assert reason.startswith("could not reach qube 'x' (exit 1); it said: ")


def test_long_stderr_is_bounded() -> None:
    message = describe_failure("x", 1, "A" * 100_000, True, "running")
    assert len(message) < 400


NAMES = [
    "inventory_hostname",
    "ansible_host",
    "ansible_qubes_name",
    "ansible_user",
    "ansible_qubes_command_timeout",
    "ansible_qubes_transport",
]


def test_facts_named_like_the_plugins_own_variables_are_found() -> None:
    variables = {
        "ansible_facts": {"qubes_name": "other", "qubes_command_timeout": 0, "user": "x"},
        "ansible_qubes_name": "other",
    }
    assert planted_variables(NAMES, variables) == [
        "ansible_qubes_command_timeout",
        "ansible_qubes_name",
    ]


def test_ordinary_facts_are_not_refused() -> None:
    facts = {"hostname": "x", "user_id": "user", "host": "x", "distribution": "Debian"}
    assert planted_variables(NAMES, {"ansible_facts": facts}) == []
    assert planted_variables(NAMES, {}) == []


def test_a_multiplexer_of_other_channel_code_is_never_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After an upgrade of the collection, a multiplexer the old version left running (for
    persist_idle) speaks the old protocol: the new client must start one of its own."""
    command = ["qvm-run", "--pass-io", "build-fedora", "qubes.VMShell"]
    path = qubes.Connection._control_path(None, command)  # type: ignore[arg-type]
    assert path == qubes.Connection._control_path(None, command)  # type: ignore[arg-type]
    monkeypatch.setattr(qubes, "_channel_code", lambda: "the code of another version")
    assert qubes.Connection._control_path(None, command) != path  # type: ignore[arg-type]
