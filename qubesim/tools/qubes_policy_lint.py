"""qubes-policy-lint FILE...: check policy files' syntax; exit 1 when any has an error."""

from __future__ import annotations

import argparse
import sys

from qubesim.policy import engine
from qubesim.tools.common import Context, parser, run


def _body(_context: Context, arguments: argparse.Namespace) -> int:
    errors = engine().lint(arguments.files)
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


def main(argv: list[str]) -> int:
    tool = parser("qubes-policy-lint", "Check the syntax of qrexec policy files.")
    tool.add_argument("files", nargs="+", metavar="FILE")
    return run(tool, argv, _body)
