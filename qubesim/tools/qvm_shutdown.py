"""qvm-shutdown: shut qubes down gracefully (qubesadmin/tools/qvm_shutdown.py).

A netvm whose clients run is refused unless --force; qubes refused as in use are retried while
that helps (their clients may be in the same call); qubes that outlive their shutdown_timeout are
killed. The exit code is the number of qubes that failed. --timeout is upstream's deprecated
spelling of --wait: its value is not used, each qube's shutdown_timeout is.
"""

from __future__ import annotations

import argparse
import sys

from qubesim.errors import QubesimError, UsageError
from qubesim.model import ADMIN_VM
from qubesim.release import since
from qubesim.runtime import QubeInUse, ShutdownTimeout
from qubesim.tools.common import Context, parser, print_error, qube_names, run

DEPRECATED_TIMEOUT = "FutureWarning: Call to deprecated --timeout option, use --wait instead"


def _targets(context: Context, arguments: argparse.Namespace) -> list[str]:
    state = context.state()
    if arguments.all:
        excluded = set(arguments.exclude)
        return [name for name in state.names() if name != ADMIN_VM and name not in excluded]
    if arguments.exclude:
        raise UsageError("--exclude can only be used with --all")
    if not arguments.VMNAME:
        raise UsageError("one of the arguments --all VMNAME is required")
    return [name for name in qube_names(state, arguments.VMNAME) if name != ADMIN_VM]


Failures = dict[str, QubesimError]


def _attempt(context: Context, names: list[str], force: bool, wait: bool) -> Failures:
    """One shutdown of every qube named (as upstream's parallel calls): what failed, and why."""
    failed: Failures = {}
    for name in names:
        try:
            context.runtime.shutdown(name, wait=False, timeout=0, force=force)
        except QubesimError as error:
            failed[name] = error
    if wait:
        state = context.state()
        for name in names:
            if name not in failed:
                try:
                    timeout = state.get_property(name, "shutdown_timeout")
                    context.runtime.wait_halted(name, timeout)
                except QubesimError as error:
                    failed[name] = error
    return failed


def _of_kind(failed: Failures, kind: type[QubesimError]) -> list[str]:
    return [name for name, error in failed.items() if isinstance(error, kind)]


def _shutdown(
    context: Context, names: list[str], force: bool, wait: bool, qubes_release: str
) -> Failures:
    failed = _attempt(context, names, force, wait)
    in_use = _of_kind(failed, QubeInUse)
    for _ in range(len(in_use)):
        print_error(
            f"Retrying shutdown of qubes that were in use: {', '.join(in_use)}", qubes_release
        )
        retried = _attempt(context, in_use, force, wait)
        for name in in_use:
            failed.pop(name)
        failed.update(retried)
        progress = len(retried) < len(in_use)
        in_use = _of_kind(retried, QubeInUse)
        if not in_use or not progress:
            break
    timed_out = _of_kind(failed, ShutdownTimeout)
    if timed_out:
        print_error(f"Killing timed out qubes: {', '.join(timed_out)}", qubes_release)
        for name in timed_out:
            context.runtime.kill(name)
            failed.pop(name)
    return failed


def _body(context: Context, arguments: argparse.Namespace) -> int:
    names = _targets(context, arguments)
    if arguments.dry_run:
        return 0
    if arguments.timeout is not None:
        print(DEPRECATED_TIMEOUT, file=sys.stderr)
        arguments.wait = True
    qubes_release = context.release()
    # --all forces the shutdown of netvms in use; from 4.3 only when no qube is excluded from it
    excluding = bool(arguments.exclude) and since(qubes_release, "4.3")
    force = arguments.force or (arguments.all and not excluding)
    failed = _shutdown(context, names, force, arguments.wait, qubes_release)
    for name, error in failed.items():
        print_error(f"Failed to shut down: {name}: {error}", qubes_release)
    return len(failed)


def main(argv: list[str]) -> int:
    tool = parser("qvm-shutdown", "Shut qubes down.")
    tool.add_argument("--all", action="store_true", help="every qube but dom0")
    tool.add_argument(
        "--exclude", action="append", default=[], metavar="VMNAME", help="leave out of --all"
    )
    tool.add_argument("--wait", action="store_true", help="wait until the qubes are halted")
    tool.add_argument("--timeout", help="deprecated: the same as --wait (the value is not used)")
    tool.add_argument(
        "--force", action="store_true", help="shut down even if other running qubes use it"
    )
    tool.add_argument("--dry-run", action="store_true", help="shut nothing down")
    tool.add_argument("VMNAME", nargs="*")
    return run(tool, argv, _body)
