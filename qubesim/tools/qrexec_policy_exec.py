"""qrexec-policy-exec --just-evaluate SOURCE TARGET SERVICE[+ARGUMENT]: would policy allow a call?

Exit 0 when the installed policy allows it, 1 otherwise; the deciding rule (or the reason) is
printed on stderr. Nothing is run.
"""

from __future__ import annotations

import argparse
import sys

from qubesim.errors import UsageError
from qubesim.qrexec import Call, InvalidRequest, Qrexec
from qubesim.tools.common import Context, parser, run


def _body(context: Context, arguments: argparse.Namespace) -> int:
    if not arguments.just_evaluate:
        raise UsageError("qubesim evaluates policy only: use --just-evaluate")
    try:
        call = Call.parse(arguments.source, arguments.target, arguments.service)
    except InvalidRequest as error:
        raise UsageError(str(error)) from None
    context.state().qube(call.source)
    decision = Qrexec(context.layout).evaluate(call)
    verdict = f"allow to {decision.target}" if decision.allowed else "deny"
    print(f"{verdict}: {decision.reason}", file=sys.stderr)
    return 0 if decision.allowed else 1


def main(argv: list[str]) -> int:
    tool = parser("qrexec-policy-exec", "Evaluate a qrexec call against the installed policy.")
    tool.add_argument("--just-evaluate", action="store_true", help="only evaluate (required)")
    tool.add_argument("source", metavar="SOURCE")
    tool.add_argument("target", metavar="TARGET")
    tool.add_argument("service", metavar="SERVICE[+ARGUMENT]")
    return run(tool, argv, _body)
