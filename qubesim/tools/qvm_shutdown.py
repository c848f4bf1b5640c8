"""qvm-shutdown: shut qubes down gracefully (processes get SIGTERM, then SIGKILL)."""

from __future__ import annotations

import argparse

from qubesim.errors import UsageError
from qubesim.model import ADMIN_VM
from qubesim.tools.common import Context, parser, run


def _targets(context: Context, arguments: argparse.Namespace) -> list[str]:
    state = context.state()
    if arguments.all:
        excluded = set(arguments.exclude)
        return [name for name in state.names() if name != ADMIN_VM and name not in excluded]
    if not arguments.VMNAME:
        raise UsageError("one of the arguments --all VMNAME is required")
    for name in arguments.VMNAME:
        state.qube(name)
    return arguments.VMNAME


def _body(context: Context, arguments: argparse.Namespace) -> None:
    for name in _targets(context, arguments):
        if name != ADMIN_VM:
            context.runtime.shutdown(name, wait=False, timeout=arguments.timeout)
    if arguments.wait:
        for name in _targets(context, arguments):
            if name != ADMIN_VM:
                context.runtime.wait_halted(name, arguments.timeout)


def main(argv: list[str]) -> int:
    tool = parser("qvm-shutdown", "Shut qubes down.")
    tool.add_argument("--all", action="store_true", help="every qube but dom0")
    tool.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="VMNAME",
        help="with --all: leave this qube running (may be repeated)",
    )
    tool.add_argument("--wait", action="store_true", help="wait until the qubes are halted")
    tool.add_argument(
        "--timeout",
        type=float,
        default=60,
        help="with --wait: fail after this many seconds (default 60)",
    )
    tool.add_argument("--force", action="store_true", help="accepted for compatibility")
    tool.add_argument("VMNAME", nargs="*")
    return run(tool, argv, _body)
