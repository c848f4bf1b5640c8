"""qvm-start: start qubes (their netvms first)."""

from __future__ import annotations

import argparse

from qubesim.errors import QubesimError
from qubesim.model import ADMIN_VM
from qubesim.tools.common import Context, parser, run


def _body(context: Context, arguments: argparse.Namespace) -> int:
    state = context.state()
    for name in arguments.VMNAME:
        state.qube(name)
    failed = 0
    for name in arguments.VMNAME:
        if name == ADMIN_VM or context.runtime.is_running(name):
            if not arguments.skip_if_running:
                print(f"qvm-start: error: domain {name} is already running", flush=True)
                failed = 1
            continue
        try:
            context.runtime.start(name)
        except QubesimError as error:
            print(f"qvm-start: error: {error}", flush=True)
            failed = 1
    return failed


def main(argv: list[str]) -> int:
    tool = parser("qvm-start", "Start qubes.")
    tool.add_argument(
        "--skip-if-running", action="store_true", help="do not fail for a qube that already runs"
    )
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
