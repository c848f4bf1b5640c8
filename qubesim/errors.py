"""Errors that end a qubesim command, each with the exit code the real Qubes tool would give."""

from __future__ import annotations


class QubesimError(Exception):
    """A failure reported to the user as `PROG: error: MESSAGE` with `exit_code`."""

    exit_code = 1


class UsageError(QubesimError):
    """Bad command-line input; argparse's convention (and qubesadmin's) is exit code 2."""

    exit_code = 2


class NoSuchQube(UsageError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no such domain: {name!r}")
