"""How the connection plugin names a failure to reach a qube."""

from __future__ import annotations

import pytest
from ansible_collections.qubes_infra.build.plugins.connection.qubes import describe_failure


@pytest.mark.parametrize(
    ("returncode", "stderr", "autostart", "expected"),
    [
        (
            2,
            "usage: qvm-run ...\nqvm-run: error: no such domain: 'x'\n",
            True,
            "qube 'x' does not exist",
        ),
        (
            1,
            "qvm-run: error: domain x is not running\n",
            False,
            "qube 'x' is not running and autostart is off",
        ),
        (126, "Request refused\n", True, "qrexec policy refused the shell service to qube 'x'"),
        (
            127,
            "bash: line 1: python3: command not found\n",
            True,
            "qube 'x' has no python3 (it is needed to run tasks)",
        ),
        (
            1,
            "strange \x1b[31mfailure\x07\n",
            True,
            "could not reach qube 'x' (exit 1): strange ?[31mfailure?",
        ),
    ],
)
def test_failures_are_told_apart(
    returncode: int, stderr: str, autostart: bool, expected: str
) -> None:
    assert describe_failure("x", returncode, stderr, autostart) == expected


def test_long_stderr_is_bounded() -> None:
    message = describe_failure("x", 1, "A" * 100_000, True)
    assert len(message) < 700
