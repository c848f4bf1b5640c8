"""check_flows.py DIR: where every flow goes under dom0's installed policy; stop at the first
wrong one.

DIR holds flows.json, a list of {"source", "target", "service", "expect"} (`expect`: the qube the
call must reach, or empty when it must be refused), and qrexec_policy.py, the collection's policy
engine. Only what a real dom0 has is read: the policy files, the qubes' facts from qvm-ls (its
documented --raw-data --fields and --tags) and the exit code of qrexec-policy-exec
--just-evaluate, which prints nothing. The engine says where an allowed call goes; the dom0 tool
must agree with it on allow or deny, or the check fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from types import ModuleType

FIELDS = ("NAME", "CLASS", "STATE", "UUID", "DEFAULT_DISPVM", "TEMPLATE_FOR_DISPVMS")
NONE = ("", "-", "None")  # how qvm-ls shows an empty value


def load_engine(directory: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("qrexec_policy", f"{directory}/qrexec_policy.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no policy engine in {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def qvm_ls(*arguments: str) -> list[str]:
    result = subprocess.run(
        ["qvm-ls", *arguments], capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout.splitlines()


def policy_tags(engine: ModuleType, policy: object) -> set[str]:
    """The tags the policy's rules mention (@tag:T and @dispvm:@tag:T, in any column)."""
    tags = set()
    for rule in policy.rules:
        for token in (rule.source, rule.target, *rule.params.values()):
            prefix = "@dispvm:@tag:" if token.startswith("@dispvm:@tag:") else "@tag:"
            if token.startswith(prefix):
                tags.add(token[len(prefix) :])
    return tags


def system(engine: ModuleType, tags: set[str]) -> object:
    """The qubes as the policy sees them, from qvm-ls."""
    tagged: dict[str, set[str]] = {}
    for tag in sorted(tags):
        for name in qvm_ls("--raw-list", "--tags", tag):
            tagged.setdefault(name, set()).add(tag)
    qubes = []
    for line in qvm_ls("--raw-data", "--fields", ",".join(FIELDS)):
        name, klass, state, uuid, default_dispvm, template_for_dispvms = line.split("|")
        qubes.append(
            engine.Qube(
                name=name,
                klass=klass,
                tags=frozenset(tagged.get(name, ())),
                default_dispvm=None if default_dispvm in NONE else default_dispvm,
                template_for_dispvms=template_for_dispvms == "True",
                running=state == "Running",
                uuid=None if uuid in NONE else uuid,
            )
        )
    return engine.System(qubes)


def dom0_allows(flow: dict[str, str]) -> bool:
    """qrexec-policy-exec --just-evaluate's verdict: exit 0 allows, 1 refuses."""
    result = subprocess.run(
        ["qrexec-policy-exec", "--just-evaluate", flow["source"], flow["target"], flow["service"]],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode not in (0, 1):
        raise RuntimeError(f"qrexec-policy-exec failed ({result.returncode}): {result.stderr}")
    return result.returncode == 0


def describe(target: str) -> str:
    return f"allowed to {target}" if target else "refused"


def check(engine: ModuleType, flows: list[dict[str, str]]) -> str | None:
    """The first wrong flow, said in words; None when all are as expected."""
    try:
        policy = engine.Policy.load()
    except engine.PolicySyntaxError as error:
        policy, broken = engine.Policy([]), f" (the policy does not load: {error})"
    else:
        broken = ""
    qubes = system(engine, policy_tags(engine, policy))
    for flow in flows:
        service, _plus, argument = flow["service"].partition("+")
        request = engine.Request(flow["source"], flow["target"], service, argument)
        decision = policy.evaluate(request, qubes)
        call = f"{flow['source']} -> {flow['target'] or '@default'} {flow['service']}"
        if dom0_allows(flow) != decision.allowed:
            verdict = "allows" if decision.allowed else "refuses"
            return f"the policy engine {verdict} {call} ({decision.reason}), dom0 does not"
        runs = decision.allowed and not engine.refusal_when_run(request, decision)
        reached = decision.target if runs else ""
        if reached != flow["expect"]:
            return (
                f"wrong flow: {call} must be {describe(flow['expect'])},"
                f" policy says {describe(reached)} ({decision.reason}){broken}"
            )
    return None


def main() -> int:
    directory = sys.argv[1]
    with open(os.path.join(directory, "flows.json")) as source:
        flows = json.load(source)
    try:
        wrong = check(load_engine(directory), flows)
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or ""
        print(f"cannot check the flows: {error} {detail}".strip())
        return 2
    if wrong:
        print(wrong)
        return 1
    print(f"all {len(flows)} flows as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
