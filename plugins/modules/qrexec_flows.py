#!/usr/bin/python
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: qrexec_flows
short_description: Where calls among qubes go under dom0's installed qrexec policy
version_added: 0.1.0
description:
  - Evaluates every given call against the policy installed in dom0 and reports the first one
    that does not go where it must.
  - The collection's policy engine tells where an allowed call goes (a real dom0's
    C(qrexec-policy-exec --just-evaluate) says only allow or refuse), and C(qrexec-policy-exec
    --just-evaluate) must agree with it on every call; a disagreement is reported as wrong.
  - Only what a real dom0 offers is read, never anything a qube says - the policy files, the
    qubes' facts from C(qvm-ls --raw-data --fields) and C(qvm-ls --raw-list --tags), and the exit
    code of C(qrexec-policy-exec).
  - The module changes nothing. It does not fail on a wrong flow, it returns it (RV(wrong)), so
    that a report can show it; it fails when the flows cannot be checked.
author:
  - qubes_infra.build maintainers (!UNKNOWN)
options:
  flows:
    description:
      - The calls, as the P(qubes_infra.build.build_infra_flows#filter) filter makes them.
    type: list
    elements: dict
    required: true
    suboptions:
      source:
        description: The calling qube.
        type: str
        required: true
      target:
        description: The qube asked for; empty for V(@default).
        type: str
        default: ""
      service:
        description: The service, with its argument after a V(+) where it has one.
        type: str
        required: true
      expect:
        description: The qube the call must reach; empty when it must be refused.
        type: str
        default: ""
  jobs:
    description:
      - How many C(qrexec-policy-exec) calls run at once. Each is a process of its own, so on a
        dom0 with a few cores a handful of them take a large matrix in a fraction of the time.
    type: int
    default: 4
attributes:
  check_mode:
    description: Reads only; runs the same in check mode.
    support: full
  diff_mode:
    description: Changes nothing, so there is nothing to show.
    support: none
"""

EXAMPLES = r"""
- name: Every call among the infrastructure's qubes goes where it must
  qubes_infra.build.qrexec_flows:
    flows: "{{ hostvars[inventory_hostname] | qubes_infra.build.build_infra_flows }}"
  register: flows

- name: Stop on the first wrong flow
  ansible.builtin.assert:
    that: flows.wrong is none
    fail_msg: "{{ flows.wrong }}"
"""

RETURN = r"""
checked:
  description: How many calls were evaluated.
  returned: success
  type: int
  sample: 588
wrong:
  description:
    - The first call, in the order given, that does not go where it must, in words; null when
      every call does.
  returned: success
  type: str
  sample: >-
    wrong flow: build-kernel -> keys-fedora qubes.Gpg must be refused, policy says allowed to
    keys-fedora (line 3 of /etc/qubes/policy.d/10-local.policy)
"""

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.qubes_infra.build.plugins.module_utils.qrexec_policy import (
    Policy,
    PolicySyntaxError,
    Qube,
    Request,
    System,
    refusal_when_run,
)

# What qvm-ls shows of each qube (its documented --raw-data form: fields joined by "|").
QVM_LS_FIELDS = ("NAME", "CLASS", "STATE", "UUID", "DEFAULT_DISPVM", "TEMPLATE_FOR_DISPVMS")
QVM_LS_NONE = ("", "-", "None")  # how qvm-ls shows an empty value


class FlowCheckError(Exception):
    """A dom0 tool did not answer as documented: the flows cannot be checked."""


class Dom0:
    """The dom0 tools the check reads. Their paths are found before any thread asks them (a
    missing one ends the module, which only the main thread may do)."""

    def __init__(self, module: AnsibleModule) -> None:
        self.module = module
        self.qvm_ls_path = module.get_bin_path("qvm-ls", required=True)
        self.policy_exec_path = module.get_bin_path("qrexec-policy-exec", required=True)

    def qvm_ls(self, *arguments: str) -> list[str]:
        rc, out, err = self.module.run_command([self.qvm_ls_path, *arguments])
        if rc != 0:
            raise FlowCheckError(f"qvm-ls {' '.join(arguments)} exited {rc}: {err.strip()}")
        return out.splitlines()

    def allows(self, flow: dict[str, str]) -> bool:
        """qrexec-policy-exec --just-evaluate's verdict: exit 0 allows, 1 refuses."""
        call = (flow["source"], flow["target"], flow["service"])
        rc, _out, err = self.module.run_command([self.policy_exec_path, "--just-evaluate", *call])
        if rc not in (0, 1):
            raise FlowCheckError(f"qrexec-policy-exec {' '.join(call)} exited {rc}: {err.strip()}")
        return rc == 0


def policy_tags(policy: Policy) -> set[str]:
    """The tags the policy's rules mention (@tag:T and @dispvm:@tag:T, in any column)."""
    tags = set()
    for rule in policy.rules:
        for token in (rule.source, rule.target, *rule.params.values()):
            prefix = "@dispvm:@tag:" if token.startswith("@dispvm:@tag:") else "@tag:"
            if token.startswith(prefix):
                tags.add(token[len(prefix) :])
    return tags


def _qvm_ls_value(value: str) -> str | None:
    return None if value in QVM_LS_NONE else value


def system(dom0: Dom0, tags: set[str]) -> System:
    """The qubes as the policy sees them, from qvm-ls (only the tags the policy mentions)."""
    tagged: dict[str, set[str]] = {}
    for tag in sorted(tags):
        for name in dom0.qvm_ls("--raw-list", "--tags", tag):
            tagged.setdefault(name, set()).add(tag)
    qubes = []
    for line in dom0.qvm_ls("--raw-data", "--fields", ",".join(QVM_LS_FIELDS)):
        fields = line.split("|")
        if len(fields) != len(QVM_LS_FIELDS):
            raise FlowCheckError(f"qvm-ls printed {line!r}, not {len(QVM_LS_FIELDS)} fields")
        name, klass, state, uuid, default_dispvm, template_for_dispvms = fields
        qubes.append(
            Qube(
                name=name,
                klass=klass,
                tags=frozenset(tagged.get(name, ())),
                default_dispvm=_qvm_ls_value(default_dispvm),
                template_for_dispvms=template_for_dispvms == "True",
                running=state == "Running",
                uuid=_qvm_ls_value(uuid),
            )
        )
    return System(qubes)


def _describe(target: str) -> str:
    return f"allowed to {target}" if target else "refused"


def judge(
    flow: dict[str, str], policy: Policy, qubes: System, dom0_allows: bool, broken: str
) -> str | None:
    """What is wrong with one flow, in words; None when it goes where it must."""
    service, _plus, argument = flow["service"].partition("+")
    request = Request(flow["source"], flow["target"], service, argument)
    decision = policy.evaluate(request, qubes)
    call = f"{flow['source']} -> {flow['target'] or '@default'} {flow['service']}"
    if dom0_allows != decision.allowed:
        verdict = "allows" if decision.allowed else "refuses"
        return f"the policy engine {verdict} {call} ({decision.reason}), dom0 does not"
    runs = decision.allowed and refusal_when_run(request, decision) is None
    reached = decision.target if runs else ""
    if reached != flow["expect"]:
        return (
            f"wrong flow: {call} must be {_describe(flow['expect'])},"
            f" policy says {_describe(reached)} ({decision.reason}){broken}"
        )
    return None


def first_wrong(dom0: Dom0, flows: list[dict[str, str]], jobs: int) -> str | None:
    """The first wrong flow in the order given. dom0's verdicts are asked `jobs` at a time (each
    call is a process), and asking stops at the first wrong one."""
    try:
        policy, broken = Policy.load(), ""
    except PolicySyntaxError as error:
        # A policy that does not load denies every call; each flow that must go somewhere says so.
        policy, broken = Policy([]), f" (the policy does not load: {error})"
    qubes = system(dom0, policy_tags(policy))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        verdicts = pool.map(dom0.allows, flows)
        for flow, dom0_allows in zip(flows, verdicts, strict=True):
            wrong = judge(flow, policy, qubes, dom0_allows, broken)
            if wrong:
                pool.shutdown(cancel_futures=True)
                return wrong
    return None


def main() -> None:
    flow_options: dict[str, Any] = {
        "source": {"type": "str", "required": True},
        "target": {"type": "str", "default": ""},
        "service": {"type": "str", "required": True},
        "expect": {"type": "str", "default": ""},
    }
    module = AnsibleModule(
        argument_spec={
            "flows": {
                "type": "list",
                "elements": "dict",
                "required": True,
                "options": flow_options,
            },
            "jobs": {"type": "int", "default": 4},
        },
        supports_check_mode=True,
    )
    jobs = module.params["jobs"]
    if jobs < 1:
        module.fail_json(msg=f"jobs: {jobs} is not a number of calls at once (at least 1)")
    flows = module.params["flows"]
    try:
        wrong = first_wrong(Dom0(module), flows, jobs)
    except FlowCheckError as error:
        module.fail_json(msg=f"cannot check the flows: {error}")
    module.exit_json(changed=False, checked=len(flows), wrong=wrong)


if __name__ == "__main__":
    main()
