"""qvm-start: start qubes, their netvms first (qubesadmin/tools/qvm_start.py)."""

from __future__ import annotations

import argparse

from qubesim.errors import QubesimError
from qubesim.tools.common import Context, parser, print_error, qube_names, run


def _start(context: Context, name: str, skip_if_running: bool) -> None:
    """qubesadmin/utils start_expert: a running qube is an error unless skipped."""
    if context.runtime.is_running(name):
        if skip_if_running:
            return
        raise QubesimError("Domain is already running")
    context.runtime.start(name)


def _body(context: Context, arguments: argparse.Namespace) -> int:
    state = context.state()
    failed = 0
    for name in qube_names(state, arguments.VMNAME):
        try:
            _start(context, name, arguments.skip_if_running)
        except QubesimError as error:
            print_error(f"Starting qube failed: {name}: {error}", state.release)
            failed = 1
    return failed


def main(argv: list[str]) -> int:
    tool = parser("qvm-start", "Start qubes.")
    tool.add_argument(
        "--skip-if-running", action="store_true", help="do not fail for a qube that already runs"
    )
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
