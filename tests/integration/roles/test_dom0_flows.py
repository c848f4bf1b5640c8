"""The dom0 role's policy allows exactly the infrastructure's flows (DESIGN.md), evaluated with
dom0's installed policy for every pair of qubes, service and argument."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qubesim import world
from qubesim.layout import current
from qubesim.qrexec import Call, Qrexec
from tests.integration.conftest import SIMULATED_INVENTORY, Qvm, ansible, audit_since, site

ENVS = ("fedora", "kernel")
LOGS = "build-logs"
NET = "sys-net"
OUTSIDER = "flow-outsider"
# The simulated inventory's upload host: the world's upload server (the fixture makes the world).
REMOTE = world.UPLOAD_HOST
SOURCES = [*(f"build-{e}" for e in ENVS), *(f"keys-{e}" for e in ENVS), LOGS, NET, OUTSIDER]
TARGETS = ["dom0", "@default", *SOURCES]
SERVICES = [
    "qubesbuilder.BuildLog",
    *(f"qubesbuilder.LogReceived+build-{e}" for e in ENVS),
    "qubes.Gpg",
    "qubesbuilder.TriggerBuild+core-admin",
    "qubesbuilder.ProcessGithubCommand",
    "local.ConnectSSH+github.com",
    f"local.ConnectSSH+{REMOTE}",
    "local.ConnectSSH+evil.example.com",
    "qubes.Filecopy",
    "qubes.VMShell",
]


def expected_flows() -> dict[tuple[str, str, str], str]:
    """(source, requested target, service) -> the qube it runs in, for every allowed call."""
    flows = {}
    for env in ENVS:
        build, keys = f"build-{env}", f"keys-{env}"
        flows[(build, "dom0", "qubesbuilder.BuildLog")] = LOGS
        flows[(LOGS, "dom0", f"qubesbuilder.LogReceived+{build}")] = keys
        flows[(build, keys, "qubes.Gpg")] = keys
        flows[(build, "@default", "qubes.Gpg")] = keys
        flows[(NET, build, "qubesbuilder.TriggerBuild+core-admin")] = build
        flows[(NET, build, "qubesbuilder.ProcessGithubCommand")] = build
        for host in ("github.com", REMOTE):
            flows[(build, NET, f"local.ConnectSSH+{host}")] = NET
    return flows


@pytest.fixture(scope="module")
def converged() -> Iterator[None]:
    world.up(world.World(current()))
    result = site("--tags", "dom0")
    assert result.returncode == 0, result.stdout + result.stderr
    subprocess.run(["qvm-create", "--label", "red", OUTSIDER], capture_output=True)
    yield
    subprocess.run(["qvm-remove", "--force", OUTSIDER], capture_output=True)


def test_policy_allows_exactly_the_infrastructure_flows(converged: None) -> None:
    qrexec = Qrexec(current())
    expected = expected_flows()
    wrong = []
    for source, target, service in itertools.product(SOURCES, TARGETS, SERVICES):
        if source == target:
            continue
        decision = qrexec.evaluate(Call.parse(source, target, service))
        actual = decision.target if decision.allowed else None
        if actual != expected.get((source, target, service)):
            wrong.append(f"{source} -> {target} {service}: {actual} ({decision.reason})")
    assert wrong == []


def test_the_dom0_tool_agrees(converged: None, qvm: Qvm) -> None:
    for (source, target, service), _ in list(expected_flows().items())[:4]:
        assert qvm("qrexec-policy-exec", "--just-evaluate", source, target, service).returncode == 0
    denied = qvm(
        "qrexec-policy-exec", "--just-evaluate", OUTSIDER, "keys-fedora", "qubes.Gpg", check=False
    )
    assert denied.returncode == 1


# Seconds a real call may take: qrexec answers a refusal or a missing service at once.
CALL_SECONDS = 10


def real_calls(qvm: Qvm, source: str, calls: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Make every (target, service) call from inside `source` (one qvm-run for all of them).

    A call that reached a service which waits (split-GPG's qubes.Gpg asks the person at the
    screen when the keys qube is not configured yet) is cut after CALL_SECONDS: exit 124, which
    is not dom0's refusal (126)."""
    quiet = "</dev/null >/dev/null 2>&1"
    script = "".join(
        f"timeout {CALL_SECONDS} qrexec-client-vm {target} {service} {quiet};"
        f' echo "{target} {service} $?"\n'
        for target, service in calls
    )
    output = qvm("qvm-run", "--pass-io", source, "sh", input=script).stdout
    return {
        (target, service): int(code)
        for target, service, code in (line.split() for line in output.splitlines())
    }


def _full_name(entry: dict[str, object]) -> str:
    return f"{entry['service']}+{entry['argument']}" if entry["argument"] else str(entry["service"])


def test_real_calls_between_qubes_follow_the_policy(converged: None, qvm: Qvm) -> None:
    """The whole matrix again, by real calls from inside each qube: an allowed call reaches its
    target (whatever its service then answers: most are not installed yet), a refused one gets
    126 from dom0; the audit log shows where each allowed call ran."""
    started = datetime.now(UTC)
    expected = expected_flows()
    wrong = []
    for source in SOURCES:
        calls = [(t, s) for t in TARGETS for s in SERVICES if t != source]
        for (target, service), code in real_calls(qvm, source, calls).items():
            if (code != 126) != ((source, target, service) in expected):
                wrong.append(f"{source} -> {target} {service}: exit {code}")
    assert wrong == []
    reached = {
        (entry["source"], entry["target"], _full_name(entry)): entry["actual_target"]
        for entry in audit_since(started)
        if entry["decision"] == "allow" and entry["source"] != "dom0"
    }
    assert reached == expected


def verify() -> subprocess.CompletedProcess[str]:
    """verify.yml's policy check only: the qubes of this host are made, not configured."""
    return ansible(
        "ansible-playbook", "-i", SIMULATED_INVENTORY, "playbooks/verify.yml", "--tags", "flows"
    )


def verify_with_rule(rule: str) -> subprocess.CompletedProcess[str]:
    """verify.yml while a policy file before the infrastructure's adds one wrong rule."""
    tamper = Path("/etc/qubes/policy.d/10-qubesim-tamper.policy")
    tamper.write_text(f"{rule}\n")
    try:
        return verify()
    finally:
        tamper.unlink()


def test_verify_playbook_names_the_first_wrong_flow(converged: None) -> None:
    result = verify_with_rule("qubes.Gpg * build-kernel keys-fedora allow")
    assert result.returncode != 0
    assert "1 of 1 checks FAIL" in result.stdout
    assert (
        "wrong flow: build-kernel -> keys-fedora qubes.Gpg must be refused,"
        " policy says allowed to keys-fedora"
    ) in result.stdout


def test_verify_playbook_fails_when_build_log_goes_to_the_wrong_qube(converged: None) -> None:
    """A real dom0's qrexec-policy-exec allows a redirected BuildLog without saying where it goes;
    verify.yml must find out (from the policy and qvm-ls) and fail."""
    result = verify_with_rule("qubesbuilder.BuildLog * build-fedora dom0 allow target=keys-fedora")
    assert result.returncode != 0
    assert (
        "wrong flow: build-fedora -> dom0 qubesbuilder.BuildLog must be allowed to build-logs,"
        " policy says allowed to keys-fedora"
    ) in result.stdout
