"""qvm-start: start qubes, their netvms first (qubesadmin/tools/qvm_start.py, main, as on the
release4.2 and release4.3 branches): qubes start in the order given; a running one stops the tool
(exit code 1) unless --skip-if-running; a qube that fails to start is reported and the others are
still started (exit code 1)."""

from __future__ import annotations

import argparse

from qubesim.errors import QubesimError
from qubesim.tools.common import Context, parser, print_error, qube_names, run


def _body(context: Context, arguments: argparse.Namespace) -> int:
    state = context.state()
    failed = 0
    for name in qube_names(state, arguments.VMNAME):
        if context.runtime.is_running(name):
            if arguments.skip_if_running:
                continue
            print_error(f"domain {name} is already running", state.release)
            return 1
        try:
            context.runtime.start(name)
        except QubesimError as error:
            print_error(str(error), state.release)
            failed = 1
    return failed


def main(argv: list[str]) -> int:
    tool = parser("qvm-start", "Start qubes.")
    tool.add_argument(
        "--skip-if-running", action="store_true", help="do not fail for a qube that already runs"
    )
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
