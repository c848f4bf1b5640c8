"""qrexec-policy-exec [--just-evaluate] SOURCE TARGET SERVICE[+ARGUMENT]: dom0's policy on a call.

As Qubes' tool (qubes-core-qrexec, qrexec/tools/qrexec_policy_exec.py): with --just-evaluate it
prints nothing and exits 0 when the policy allows the call, 1 otherwise; a call to the caller
itself evaluates as allowed. Without it, it prints the policy's answer as qrexec-daemon reads it
(`result=deny`, or the lines of an allow) with the same exit code; a call to the caller itself is
denied there, since it would be refused when run. An empty TARGET is @default; an unknown SOURCE is
matched as Qubes matches it (by `*`, `@anyvm` and its own name only). The five-argument form, which
runs a call for qrexec-daemon, has no use in qubesim: its qrexec daemon runs calls itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from qubesim.errors import UsageError
from qubesim.policy import engine
from qubesim.qrexec import Qrexec
from qubesim.tools.common import Context, parser, run

DENY = "result=deny"


def _allow_lines(request: Any, decision: Any, system: Any) -> list[str]:
    """The answer for an allowed call (qrexec/policy/parser.py, AllowResolution.execute)."""
    target = decision.target
    lines = [f"user={decision.user or 'DEFAULT'}", "result=allow", f"target={target}"]
    if target.startswith("@dispvm:"):
        template = system.get(target[len("@dispvm:") :])
        lines.append(f"target_uuid=@dispvm:uuid:{template.uuid}")
    elif target != engine().ADMIN_VM:
        lines.append(f"target_uuid=uuid:{system.get(target).uuid}")
    lines += [f"autostart={decision.autostart}", f"requested_target={decision.requested_target}"]
    return lines


def answer(
    evaluate: Callable[[Any], Any],
    system: Any,
    call: tuple[str, str, str],
    just_evaluate: bool,
) -> tuple[int, str]:
    """(exit code, what goes on stdout) for a call (SOURCE, TARGET, SERVICE[+ARGUMENT]) under
    `evaluate`, a policy's decision for a request."""
    source, target, service_and_argument = call
    service, _, argument = service_and_argument.partition("+")
    request = engine().Request(source, target, service, argument)
    decision = evaluate(request)
    if just_evaluate:
        return (0 if decision.allowed else 1), ""
    if not decision.allowed or engine().refusal_when_run(request, decision):
        return 1, DENY + "\n"
    return 0, "\n".join(_allow_lines(request, decision, system)) + "\n"


def _body(context: Context, arguments: argparse.Namespace) -> int:
    if len(arguments.call) != 3:
        if len(arguments.call) == 5:
            raise UsageError("running a call for qrexec-daemon is not simulated by qubesim")
        raise UsageError(f"Must have 3 or 5 positional arguments, not {len(arguments.call)}")
    qrexec = Qrexec(context.layout)
    source, target, service = arguments.call
    code, output = answer(
        qrexec.evaluate_request, qrexec.system(), (source, target, service), arguments.just_evaluate
    )
    print(output, end="")
    return code


def main(argv: list[str]) -> int:
    tool = parser("qrexec-policy-exec", "Evaluate a qrexec call against the installed policy.")
    tool.add_argument(
        "--just-evaluate",
        action="store_true",
        help="do not run the service, only evaluate policy; exit code 0 means allow",
    )
    tool.add_argument("call", nargs="*", metavar="SOURCE TARGET SERVICE[+ARGUMENT]")
    return run(tool, argv, _body)
