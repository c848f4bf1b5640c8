"""qvm-remove: remove halted qubes and their volumes (qubesadmin/tools/qvm_remove.py).

--force only skips the prompt: a running qube is refused, as qubesd refuses it. 4.3 refuses dom0
before anything and writes its messages on stderr; 4.2 writes them on stdout, and asks before
qubesd refuses dom0."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import TextIO

from qubesim import template
from qubesim.errors import QubesimError
from qubesim.model import ADMIN_VM, State
from qubesim.properties import OWN_ROOT
from qubesim.release import since
from qubesim.tools.common import Context, parser, qube_names, run


def _messages(state: State) -> TextIO:
    """Where qvm-remove's own messages go: stderr from 4.3, stdout before."""
    return sys.stderr if since(state.release, "4.3") else sys.stdout


def _confirmed(names: list[str], messages: TextIO) -> bool:
    print("This will completely remove the selected VM(s)...", file=messages)
    for name in names:
        print(" ", name)
    print("Are you sure? [y/N] ", end="", flush=True)
    return sys.stdin.readline().strip().upper() == "Y"


def _in_use(name: str, users: list[tuple[str | None, str]], messages: TextIO) -> None:
    """qvm_remove.py main: where a qube that qubesd refused as in use is still referred to."""
    if users:
        print(f"VM {name} cannot be removed. It is in use as:", file=messages)
        for holder, prop in users:
            where = f"{prop} for {holder}" if holder else f"global property {prop}"
            print(f" - {where}", file=messages)


def _check_removable(context: Context, name: str) -> None:
    """qubes/app.py VMCollection.__delitem__: halted, and referred to by nothing; dom0 never
    (qubes/api/admin.py vm_remove)."""
    state = context.state()
    messages = _messages(state)
    if name == ADMIN_VM:
        # qubesadmin's vm_dependencies leaves out references that are defaults: of dom0's, only
        # the global ones
        _in_use(name, [use for use in state.dependents(name) if use[0] is None], messages)
        raise QubesimError(f"{name!r} cannot be removed")
    if context.runtime.running(name) is not None:
        raise QubesimError(f"Domain is not powered off: {name!r}")
    users = state.dependents(name)
    if users:
        _in_use(name, users, messages)
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
    names = qube_names(state, arguments.VMNAME)
    messages = _messages(state)
    if ADMIN_VM in names and since(state.release, "4.3"):
        print("Domain 'dom0' cannot be removed.", file=sys.stderr)
        return 1
    if not arguments.force and not _confirmed(names, messages):
        print("Remove cancelled.", file=messages)
        return 1
    for name in names:
        _remove(context, name)
    return 0


def main(argv: list[str]) -> int:
    tool = parser("qvm-remove", "Remove qubes.")
    tool.add_argument("--force", "-f", action="store_true", help="do not ask for confirmation")
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
