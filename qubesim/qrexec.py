"""qrexec in dom0: who may call what (the policy engine), running the service in its target, and
the audit log. Calls from qubes come through the qrexec daemon and are subject to policy; calls from
dom0 (qvm-run) are not, as in Qubes, but take the same way into the target.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qubesim import audit
from qubesim.errors import QubesimError
from qubesim.layout import Layout
from qubesim.model import ADMIN_VM, Database
from qubesim.policy import engine
from qubesim.runtime import Runtime

# The limits of a request from a qube (qrexec-client-vm truncates the target to them); dom0 checks
# them again, since the request is untrusted, and replaces any other character of the target with
# '_' (qrexec-daemon.c, sanitize_name). An empty target is passed on: policy reads it as @default.
TARGET_MAX = 63
SERVICE_MAX = 64999
_TARGET_OTHER_CHARACTERS = re.compile(r"[^A-Za-z0-9_.@:-]")
_SERVICE = re.compile(r"[A-Za-z0-9_.-]+(\+[A-Za-z0-9_.+-]*)?")
EXIT_REFUSED = 126
DELAY_VARIABLE = "QUBESIM_QREXEC_DELAY_MS"
DOM0_REASON = "dom0 is not subject to policy"


class InvalidRequest(QubesimError):
    pass


@dataclass(frozen=True)
class Call:
    source: str
    target: str  # as requested
    service: str
    argument: str

    @classmethod
    def parse(cls, source: str, target: str, full_service: str) -> Call:
        if len(target.encode()) > TARGET_MAX:
            raise InvalidRequest(f"invalid target: {target[:80]!r}")
        target = _TARGET_OTHER_CHARACTERS.sub("_", target)
        if not _SERVICE.fullmatch(full_service) or len(full_service.encode()) > SERVICE_MAX:
            raise InvalidRequest(f"invalid service: {full_service[:80]!r}")
        service, _, argument = full_service.partition("+")
        return cls(source, target, service, argument)

    def request(self) -> Any:
        """The call as the policy engine takes it."""
        return engine().Request(self.source, self.target, self.service, self.argument)

    @property
    def full_service(self) -> str:
        return f"{self.service}+{self.argument}" if self.argument else self.service


@dataclass(frozen=True)
class Decided:
    """What dom0 decided on a call, as the audit log records it and the call runs."""

    actual_target: str
    decision: str  # allow | deny
    rule: str
    reason: str
    user: str | None = None
    target_type: str = "name"


def guest_runner() -> Path:
    """The service runner; the same script runs in qubes (from their template) and in dom0."""
    return Path(str(resources.files("qubesim") / "guest" / "qubesim-exec"))


def _delay() -> None:
    milliseconds = float(os.environ.get(DELAY_VARIABLE) or 0)
    if milliseconds > 0:
        time.sleep(milliseconds / 1000)


class Qrexec:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.database = Database(layout)
        self.runtime = Runtime(layout)
        # The ids of the dom0 calls this object started, by (target, service), until they end.
        self._dom0_calls: dict[tuple[str, str], list[str]] = {}

    # -- policy -----------------------------------------------------------------------------------
    def system(self) -> Any:
        policy = engine()
        state = self.database.read()
        qubes = []
        for name in state.names():
            record = state.qube(name)
            has = state.has_property
            qubes.append(
                policy.Qube(
                    name=name,
                    klass=record["klass"],
                    tags=frozenset(record["tags"]),
                    default_dispvm=state.get_property(name, "default_dispvm")
                    if has(name, "default_dispvm")
                    else None,
                    template_for_dispvms=bool(
                        has(name, "template_for_dispvms")
                        and state.get_property(name, "template_for_dispvms")
                    ),
                    running=self.runtime.is_running(name),
                    uuid=record["uuid"],
                )
            )
        return policy.System(qubes)

    def evaluate(self, call: Call) -> Any:
        return self.evaluate_request(call.request())

    def evaluate_request(self, request: Any) -> Any:
        """The installed policy's decision; a policy that does not load denies everything, saying
        why."""
        policy = engine()
        try:
            loaded = policy.Policy.load()
        except policy.PolicySyntaxError as error:
            return policy.Decision(
                allowed=False,
                target=None,
                user=None,
                autostart=False,
                notify=True,
                rule=None,
                reason=f"policy error: {error}",
                requested_target_type="name",
            )
        return loaded.evaluate(request, self.system())

    # -- calls ------------------------------------------------------------------------------------
    def call_from_qube(
        self,
        call: Call,
        stdio: Sequence[int],
        started: Callable[[], None],
        requested_source: str = "",
    ) -> int | None:
        """Run a qube's call if policy allows it; None when refused. `started` is told first.
        `requested_source` is qrexec-client-vm's --source-qube. The decision is audited when it
        is made, the end when the call ends (before the caller hears of it)."""
        _delay()
        decided = self._decide(call, requested_source)
        if decided.decision != "allow":
            self._audit_refused(call, decided)
            return None
        call_id = self._audit_decision(call, decided)
        try:
            argv = self._service_argv(
                call, decided.actual_target, decided.user, decided.target_type
            )
        except QubesimError as error:
            self._audit_end(call_id, EXIT_REFUSED, str(error))
            return None
        started()
        code = _run(argv, stdio)
        self._audit_end(call_id, code)
        return code

    def _decide(self, call: Call, requested_source: str) -> Decided:
        """Policy's decision on a qube's call, with what qrexec refuses before running it."""
        if requested_source:
            return Decided("", "deny", "", self._requested_source_refusal(requested_source))
        decision = self.evaluate(call)
        rule = decision.rule_location
        if not decision.allowed:
            return Decided("", "deny", rule, decision.reason)
        target = decision.target
        refusal = engine().refusal_when_run(call.request(), decision)
        if refusal:
            return Decided(target, "deny", rule, refusal)
        if target.startswith("@dispvm"):
            return Decided(target, "deny", rule, "disposable qubes are not simulated")
        return Decided(
            target, "allow", rule, decision.reason, decision.user, decision.requested_target_type
        )

    def _requested_source_refusal(self, name: str) -> str:
        """Qubes accepts a requested source only for a RemoteVM relayed by the caller
        (qrexec/policy/parser.py, Request); qubesim has no RemoteVMs, so it always refuses."""
        if name not in self.database.read().names():
            return f"unknown requested source qube {name!r}"
        return f"{name}: requested source is only authorized for RemoteVM"

    def call_from_dom0(self, target: str, user: str | None, full_service: str) -> list[str]:
        """The command for a dom0 call (not subject to policy) with the caller's stdio; the caller
        runs it and reports the exit code with `audit_dom0_call`. The call is audited as started
        here, once its target runs."""
        _delay()
        call = Call.parse(ADMIN_VM, target, full_service)
        argv = self._service_argv(call, target, user, "name")
        decided = Decided(target, "allow", "", DOM0_REASON)
        self._dom0_calls.setdefault((target, full_service), []).append(
            self._audit_decision(call, decided)
        )
        return argv

    def audit_dom0_call(self, target: str, full_service: str, code: int) -> None:
        """The end of a dom0 call started with `call_from_dom0` (recorded whole if it was not)."""
        started = self._dom0_calls.get((target, full_service))
        if started:
            self._audit_end(started.pop(), code)
            return
        call = Call.parse(ADMIN_VM, target, full_service)
        self._audit_end(self._audit_decision(call, Decided(target, "allow", "", DOM0_REASON)), code)

    def _service_argv(
        self, call: Call, target: str, user: str | None, target_type: str
    ) -> list[str]:
        if target == ADMIN_VM:
            extra = [
                f"QREXEC_REQUESTED_TARGET={call.target}",
                f"QREXEC_REQUESTED_TARGET_KEYWORD={call.target.removeprefix('@')}"
                if target_type == "keyword"
                else "QREXEC_REQUESTED_TARGET_KEYWORD=",
            ]
            runner = ["sh", str(guest_runner()), "root", call.source, target_type]
            return [*runner, call.full_service, *extra]
        running = self.runtime.start(target)
        user = user or self.database.read().get_property(target, "default_user")
        return self.runtime.service_argv(target, running, user, call.full_service, call.source)

    # -- audit ------------------------------------------------------------------------------------
    def _decision_record(self, call: Call, decided: Decided) -> audit.Decision:
        return audit.Decision(
            call=audit.new_call_id(),
            time=audit.now(),
            source=call.source,
            target=call.target,
            actual_target=decided.actual_target,
            service=call.service,
            argument=call.argument,
            decision=decided.decision,
            rule=decided.rule,
            reason=decided.reason,
        )

    def _audit_decision(self, call: Call, decided: Decided) -> str:
        """Record an allowed call's decision; return the call's id."""
        decision = self._decision_record(call, decided)
        audit.record(self.layout, decision=decision)
        return decision.call

    def _audit_refused(self, call: Call, decided: Decided) -> None:
        """A refused call is decided and ended at once: both in one write."""
        decision = self._decision_record(call, decided)
        end = audit.End(call=decision.call, time=decision.time, exit_code=EXIT_REFUSED)
        audit.record(self.layout, decision=decision, end=end)

    def _audit_end(self, call_id: str, code: int, error: str = "") -> None:
        end = audit.End(call=call_id, time=audit.now(), exit_code=code, error=error)
        audit.record(self.layout, end=end)


def _run(argv: list[str], stdio: Sequence[int]) -> int:
    code = subprocess.run(argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2]).returncode
    return 128 - code if code < 0 else code
