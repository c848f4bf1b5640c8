"""qvm-check: does a qube exist (or run); the answer is the exit code."""

from __future__ import annotations

import argparse

from qubesim.tools.common import Context, parser, run


def _body(context: Context, arguments: argparse.Namespace) -> int:
    state = context.state()
    for name in arguments.VMNAME:
        state.qube(name)
    if arguments.running:
        halted = [name for name in arguments.VMNAME if not context.runtime.is_running(name)]
        if halted:
            if not arguments.quiet:
                print(f"{', '.join(halted)}: {'are' if len(halted) > 1 else 'is'} not running")
            return 1
        if not arguments.quiet:
            names = ", ".join(arguments.VMNAME)
            print(f"{names}: {'are' if len(arguments.VMNAME) > 1 else 'is'} running")
        return 0
    if not arguments.quiet:
        names = ", ".join(arguments.VMNAME)
        print(f"{names}: {'exist' if len(arguments.VMNAME) > 1 else 'exists'}")
    return 0


def main(argv: list[str]) -> int:
    tool = parser("qvm-check", "Tell by the exit code whether qubes exist (or run).")
    tool.add_argument("--running", action="store_true", help="whether they are running")
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
