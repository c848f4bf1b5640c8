"""qvm-remove: remove halted qubes and their volumes (qubesadmin/tools/qvm_remove.py).

--force only skips the prompt: a running qube is refused, as qubesd refuses it."""

from __future__ import annotations

import argparse
import shutil
import sys

from qubesim import template
from qubesim.errors import QubesimError
from qubesim.model import ADMIN_VM
from qubesim.properties import OWN_ROOT
from qubesim.tools.common import Context, parser, run


def _confirmed(names: list[str]) -> bool:
    print("This will completely remove the selected VM(s)...", file=sys.stderr)
    for name in names:
        print(" ", name)
    print("Are you sure? [y/N] ", end="", flush=True)
    return sys.stdin.readline().strip().upper() == "Y"


def _check_removable(context: Context, name: str) -> None:
    """qubes/app.py VMCollection.__delitem__: halted, and referred to by nothing."""
    state = context.state()
    if context.runtime.running(name) is not None:
        raise QubesimError(f"Domain is not powered off: {name!r}")
    users = state.dependents(name)
    if users:
        print(f"VM {name} cannot be removed. It is in use as:", file=sys.stderr)
        for holder, prop in users:
            where = f"{prop} for {holder}" if holder else f"global property {prop}"
            print(f" - {where}", file=sys.stderr)
        raise QubesimError(f"Domain is in use: {name!r}")


def _remove(context: Context, name: str) -> None:
    _check_removable(context, name)
    with context.transaction() as state:
        klass = state.qube(name)["klass"]
        del state.qubes[name]
    if klass in OWN_ROOT:
        template.unmount(context.layout, name)
    shutil.rmtree(context.layout.qube_dir(name), ignore_errors=True)


def _body(context: Context, arguments: argparse.Namespace) -> int:
    state = context.state()
    for name in arguments.VMNAME:
        state.qube(name)
    if ADMIN_VM in arguments.VMNAME:
        print("Domain 'dom0' cannot be removed.", file=sys.stderr)
        return 1
    if not arguments.force and not _confirmed(arguments.VMNAME):
        print("Remove cancelled.", file=sys.stderr)
        return 1
    for name in arguments.VMNAME:
        _remove(context, name)
    return 0


def main(argv: list[str]) -> int:
    tool = parser("qvm-remove", "Remove qubes.")
    tool.add_argument("--force", "-f", action="store_true", help="do not ask for confirmation")
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
