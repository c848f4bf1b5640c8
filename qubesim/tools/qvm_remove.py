"""qvm-remove: remove qubes and their volumes."""

from __future__ import annotations

import argparse
import shutil
import sys

from qubesim import template
from qubesim.errors import QubesimError
from qubesim.model import ADMIN_VM
from qubesim.tools.common import Context, parser, run


def _confirmed(names: list[str]) -> bool:
    print("This will completely remove the selected VM(s)...")
    for name in names:
        print(f" {name}")
    print("Are you sure? [y/N] ", end="", flush=True)
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def _check_removable(context: Context, name: str, force: bool) -> None:
    state = context.state()
    state.qube(name)
    if name == ADMIN_VM:
        raise QubesimError("dom0 cannot be removed")
    users = state.dependents(name)
    if users:
        raise QubesimError(f"{name} is in use by: {', '.join(users)}")
    if context.runtime.is_running(name) and not force:
        raise QubesimError(f"{name} is running; shut it down first, or use --force to kill it")


def _body(context: Context, arguments: argparse.Namespace) -> int:
    for name in arguments.VMNAME:
        _check_removable(context, name, arguments.force)
    if not arguments.force and not _confirmed(arguments.VMNAME):
        print("Aborted.")
        return 1
    for name in arguments.VMNAME:
        context.runtime.kill(name)
        with context.database.transaction() as state:
            klass = state.qube(name)["klass"]
            del state.qubes[name]
        if klass == "TemplateVM":
            template.unmount(context.layout, name)
        shutil.rmtree(context.layout.qube_dir(name), ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    tool = parser("qvm-remove", "Remove qubes.")
    tool.add_argument(
        "--force", "-f", action="store_true", help="do not ask for confirmation; kill running qubes"
    )
    tool.add_argument("VMNAME", nargs="+")
    return run(tool, argv, _body)
