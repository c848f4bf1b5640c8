"""How qvm-run hands a command line to qubes.VMShell, checked with a real bash reading a pipe."""

from __future__ import annotations

import subprocess

import pytest

from qubesim.tools.qvm_run import shell_input


@pytest.mark.parametrize(
    ("command", "data", "expected"),
    [
        ("cat", b"line one\nrm -rf /nonexistent\n", b"line one\nrm -rf /nonexistent\n"),
        ("head -c 3", b"abcdef\necho executed\n", b"abc"),
        ("sleep 0 & true", b"echo executed\n", b""),
        ("printf '%s' \"$((6 * 7))\"", b"", b"42"),
    ],
)
def test_data_after_the_command_is_input_never_code(
    command: str, data: bytes, expected: bytes
) -> None:
    result = subprocess.run(
        ["bash"], input=shell_input(command) + data, capture_output=True, timeout=10
    )
    assert result.stdout == expected


def test_exit_code_is_the_commands() -> None:
    result = subprocess.run(["bash"], input=shell_input("exit 9"), capture_output=True, timeout=10)
    assert result.returncode == 9
    result = subprocess.run(["bash"], input=shell_input("false"), capture_output=True, timeout=10)
    assert result.returncode == 1


def test_a_command_ending_in_an_ampersand_is_a_syntax_error_as_in_qubes() -> None:
    result = subprocess.run(
        ["bash"], input=shell_input("sleep 0 &"), capture_output=True, timeout=10
    )
    assert result.returncode == 2
    assert b"syntax error" in result.stderr
