"""qvm-check: whether qubes exist, run, are templates or networked (qubesadmin/tools/qvm_check.py).

The answer is the exit code: 0 when every qube passes, 1 when none does (or one does not exist),
3 when only some do. Messages are logged on stderr, as upstream's logger does."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qubesim.errors import UsageError
from qubesim.model import ADMIN_VM, State
from qubesim.tools.common import Context, log, parser, run

Check = Callable[[str], bool]


def _filters(context: Context, state: State, arguments: argparse.Namespace) -> dict[str, Check]:
    wanted = {
        "running": context.runtime.is_running,
        # qubesim does not pause qubes: none is ever paused
        "paused": lambda _name: False,
        "template": lambda name: state.qube(name)["klass"] == "TemplateVM",
        "networked": state.is_networked,
    }
    return {status: check for status, check in wanted.items() if getattr(arguments, status)}


def _domains(state: State, arguments: argparse.Namespace) -> tuple[list[str], list[str]]:
    if arguments.all:
        excluded = set(arguments.exclude)
        names = [name for name in state.names() if name != ADMIN_VM and name not in excluded]
        return names, []
    if arguments.exclude:
        raise UsageError("--exclude can only be used with --all")
    if not arguments.VMNAME:
        raise UsageError("one of the arguments --all VMNAME is required")
    return (
        [name for name in arguments.VMNAME if name in state.qubes],
        [name for name in arguments.VMNAME if name not in state.qubes],
    )


def _report(arguments: argparse.Namespace, names: list[str], status: list[str]) -> None:
    if arguments.quiet >= arguments.verbose:
        return
    if not names:
        log("qvm-check", f"None of qubes: {', '.join(status)}")
    for name in sorted(names):
        log("qvm-check", f"{name}: {', '.join(status)}")


def _body(context: Context, arguments: argparse.Namespace) -> int:
    state = context.state()
    domains, missing = _domains(state, arguments)
    filters = _filters(context, state, arguments)
    code = 0
    if filters:
        passed = [name for name in domains if all(check(name) for check in filters.values())]
        if len(passed) != len(domains):
            code = 3 if passed else 1
        _report(arguments, passed, list(filters))
    elif not domains:
        code = 1
    else:
        _report(arguments, domains, ["exists"])
    for name in missing:
        # a warning: printed even with --quiet (logging's last resort handler)
        message = f"{name}: non-existent!"
        if arguments.quiet >= arguments.verbose:
            print(message, file=sys.stderr)
        else:
            log("qvm-check", message)
        code = 1
    return code


def main(argv: list[str]) -> int:
    tool = parser("qvm-check", "Tell by the exit code whether qubes exist, run, and so on.")
    tool.set_defaults(verbose=1)
    tool.add_argument("--all", action="store_true", help="every qube but dom0")
    tool.add_argument("--exclude", action="append", default=[], metavar="VMNAME")
    tool.add_argument("--running", action="store_true", help="whether they run")
    tool.add_argument("--paused", action="store_true", help="whether they are paused")
    tool.add_argument("--template", action="store_true", help="whether they are templates")
    tool.add_argument("--networked", action="store_true", help="whether they reach a network")
    tool.add_argument("VMNAME", nargs="*")
    return run(tool, argv, _body)
