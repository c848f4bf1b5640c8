"""qvm-kill: stop qubes at once, as pulling the plug would."""

from __future__ import annotations

import argparse

from qubesim.errors import QubesimError
from qubesim.model import ADMIN_VM
from qubesim.tools.common import Context, parser, qube_names, run


def _body(context: Context, arguments: argparse.Namespace) -> None:
    for name in qube_names(context.state(), arguments.VMNAME):
        if name == ADMIN_VM:
            raise QubesimError("dom0 cannot be killed")
        context.runtime.kill(name)


def main(argv: list[str]) -> int:
    tool = parser("qvm-kill", "Kill qubes: every process in them ends at once.")
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
