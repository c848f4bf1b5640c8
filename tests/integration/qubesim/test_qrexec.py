"""qrexec between qubes: policy decides, the service runs in the target, the audit log tells."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from qubesim.layout import current
from tests.integration.conftest import Policy, Qvm, as_root, audit_since, run_tool

ECHO_SERVICE = """#!/bin/sh
echo "user=$(id -un) arg=${1-} remote=$QREXEC_REMOTE_DOMAIN full=$QREXEC_SERVICE_FULL_NAME \
argument=$QREXEC_SERVICE_ARGUMENT type=$QREXEC_REQUESTED_TARGET_TYPE host=$(hostname)"
touch /tmp/test-echo-ran
"""


def install_service(qvm: Qvm, qube: str, name: str, script: str) -> None:
    """A qrexec service in a qube's /usr/local/etc/qubes-rpc (persistent, as in Qubes AppVMs)."""
    as_root(
        qube,
        f"mkdir -p /usr/local/etc/qubes-rpc && cat > /usr/local/etc/qubes-rpc/{name}"
        f" && chmod 755 /usr/local/etc/qubes-rpc/{name}",
        input=script,
    )


def call(
    qvm: Qvm, source: str, target: str, service: str, data: str = ""
) -> subprocess.CompletedProcess[str]:
    return qvm(
        "qvm-run",
        "--pass-io",
        source,
        f"qrexec-client-vm {target} {service}",
        input=data,
        check=False,
    )


@pytest.fixture
def pair(qvm: Qvm, new_name: Callable[[], str]) -> tuple[str, str]:
    source, target = new_name(), new_name()
    for name in (source, target):
        qvm("qvm-create", "--label", "red", "--property", "netvm=", name)
    install_service(qvm, target, "test.Echo", ECHO_SERVICE)
    return source, target


def test_allowed_call_runs_in_target_with_user_argument_and_environment(
    qvm: Qvm, policy: Policy, pair: tuple[str, str]
) -> None:
    source, target = pair
    policy(
        f"test.Echo +as-root {source} {target} allow user=root",
        f"test.Echo * {source} {target} allow",
    )
    result = call(qvm, source, target, "test.Echo+hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"user=user arg=hello remote={source} full=test.Echo+hello argument=hello type="
        f" host={target}\n"
    )
    root_call = call(qvm, source, target, "test.Echo+as-root")
    assert root_call.stdout.startswith("user=root arg=as-root ")
    bare = call(qvm, source, target, "test.Echo")
    assert "arg= " in bare.stdout and "argument= " in bare.stdout


def test_denied_call_exits_126_runs_nothing_and_is_audited(
    qvm: Qvm, policy: Policy, pair: tuple[str, str]
) -> None:
    source, target = pair
    path = policy("test.Other * @anyvm @anyvm allow", f"test.Echo * {source} {target} deny")
    started = datetime.now(UTC)
    result = call(qvm, source, target, "test.Echo+x")
    assert (result.returncode, result.stderr) == (126, "Request refused\n")
    ran = qvm(
        "qvm-run", "--pass-io", target, "ls /tmp/test-echo-ran 2>/dev/null || echo absent"
    ).stdout
    assert ran == "absent\n"
    entries = [e for e in audit_since(started) if e["source"] == source]
    assert [
        (e["target"], e["service"], e["argument"], e["decision"], e["rule"], e["exit_code"])
        for e in entries
    ] == [(target, "test.Echo", "x", "deny", f"{path}:2", 126)]
    # Decided and ended at once.
    assert entries[0]["end_time"] == entries[0]["time"]


def test_no_matching_rule_denies(qvm: Qvm, policy: Policy, pair: tuple[str, str]) -> None:
    source, target = pair
    policy(f"test.Other * {source} {target} allow")
    assert call(qvm, source, target, "test.Echo").returncode == 126


def test_redirect_runs_in_the_redirect_target(
    qvm: Qvm, policy: Policy, pair: tuple[str, str]
) -> None:
    source, target = pair
    policy(f"test.Echo * {source} dom0 allow target={target}")
    started = datetime.now(UTC)
    result = call(qvm, source, "dom0", "test.Echo")
    assert result.returncode == 0, result.stderr
    assert f"host={target}" in result.stdout
    [entry] = [e for e in audit_since(started) if e["source"] == source]
    assert (entry["target"], entry["actual_target"], entry["exit_code"]) == ("dom0", target, 0)


def test_autostart(qvm: Qvm, policy: Policy, pair: tuple[str, str]) -> None:
    source, target = pair
    policy(
        f"test.Echo +no {source} {target} allow autostart=no",
        f"test.Echo * {source} {target} allow",
    )
    qvm("qvm-start", source)
    qvm("qvm-shutdown", "--wait", target)
    assert call(qvm, source, target, "test.Echo+no").returncode == 126
    assert qvm("qvm-check", "--running", target, check=False).returncode == 1
    assert call(qvm, source, target, "test.Echo+yes").returncode == 0
    assert qvm("qvm-check", "--running", target).returncode == 0


def test_missing_service_exits_127(qvm: Qvm, policy: Policy, pair: tuple[str, str]) -> None:
    source, target = pair
    policy(f"test.Missing * {source} {target} allow")
    assert call(qvm, source, target, "test.Missing").returncode == 127


def test_a_syntax_error_in_any_policy_file_denies_every_call(
    qvm: Qvm, policy: Policy, pair: tuple[str, str]
) -> None:
    source, target = pair
    policy(f"test.Echo * {source} {target} allow")
    assert call(qvm, source, target, "test.Echo").returncode == 0
    broken = policy("test.Echo * @anyvm @anyvm permit", name="31-qubesim-broken.policy")
    started = datetime.now(UTC)
    assert call(qvm, source, target, "test.Echo").returncode == 126
    [entry] = [e for e in audit_since(started) if e["source"] == source]
    assert f"{broken}:1" in str(entry["reason"])


def test_binary_data_flows_both_ways(qvm: Qvm, policy: Policy, pair: tuple[str, str]) -> None:
    source, target = pair
    install_service(qvm, target, "test.Cat", "#!/bin/sh\nexec cat\n")
    policy(f"test.Cat * {source} {target} allow")
    data = bytes(range(256)) * 4096
    result = subprocess.run(
        ["qvm-run", "--pass-io", source, "qrexec-client-vm " + target + " test.Cat"],
        input=data,
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == data


def test_local_program_talks_to_the_service(
    qvm: Qvm, policy: Policy, pair: tuple[str, str]
) -> None:
    source, target = pair
    install_service(qvm, target, "test.Upper", "#!/bin/sh\nhead -n1 | tr a-z A-Z\n")
    policy(f"test.Upper * {source} {target} allow")
    script = f"qrexec-client-vm {target} test.Upper /bin/sh -c 'echo shout >&1; cat >&2'"
    result = qvm("qvm-run", "--pass-io", source, script)
    assert result.stderr == "SHOUT\n"


def test_a_qube_cannot_claim_to_be_another(qvm: Qvm, policy: Policy, pair: tuple[str, str]) -> None:
    """The request names no source; one that tries is still taken as coming from its qube."""
    source, target = pair
    policy(f"test.Echo * dom0 {target} allow", f"test.Echo * {source} {target} deny")
    forged = (
        "import json, socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect('/run/qubesim/qrexec.sock')\n"
        f"request = json.dumps({{'target': '{target}', 'service': 'test.Echo',"
        " 'source': 'dom0'})\n"
        "s.sendmsg([request.encode() + b'\\n'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,"
        " __import__('array').array('i', [0, 1, 2]).tobytes())])\n"
        "print(s.makefile().readline().strip())\n"
    )
    result = qvm("qvm-run", "--pass-io", source, "python3 -", input=forged)
    assert json.loads(result.stdout) == {"status": "refused"}


def test_a_qube_cannot_replace_the_qrexec_socket(qvm: Qvm, appvm: str) -> None:
    result = as_root(
        appvm,
        "rm -f /run/qubesim/qrexec.sock 2>&1; ls /run/qubesim",
        check=False,
    )
    assert "qrexec.sock" in result.stdout


def test_dom0_as_target(qvm: Qvm, policy: Policy, pair: tuple[str, str]) -> None:
    source, _ = pair
    service = Path("/etc/qubes-rpc/test.Dom0")
    service.write_text(
        '#!/bin/sh\necho "$QREXEC_REMOTE_DOMAIN $QREXEC_REQUESTED_TARGET_TYPE'
        ' $QREXEC_REQUESTED_TARGET $(id -un)"\n'
    )
    service.chmod(0o755)
    try:
        policy(f"test.Dom0 * {source} @adminvm allow")
        result = call(qvm, source, "dom0", "test.Dom0")
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{source} name dom0 root\n"
    finally:
        service.unlink()


def test_policy_tools_in_dom0(
    qvm: Qvm, policy: Policy, pair: tuple[str, str], tmp_path: Path
) -> None:
    source, target = pair
    policy(f"test.Echo * {source} {target} allow")
    assert qvm("qrexec-policy-exec", "--just-evaluate", source, target, "test.Echo").returncode == 0
    denied = qvm("qrexec-policy-exec", "--just-evaluate", target, source, "test.Echo", check=False)
    assert denied.returncode == 1
    good, bad = tmp_path / "good.policy", tmp_path / "bad.policy"
    good.write_text("test.Echo * @anyvm @anyvm deny\n")
    bad.write_text("# comment\ntest.Echo * @anyvm\n")
    assert qvm("qubes-policy-lint", str(good)).returncode == 0
    linted = qvm("qubes-policy-lint", str(good), str(bad), check=False)
    assert linted.returncode == 1
    assert f"{bad}:2:" in linted.stderr


# -- the audit log: a call's decision when it is made, its end when it ends ------------------------
# qubes-core-qrexec, qrexec/tools/qrexec_policy_exec.py: LogAllowedResolution.execute logs an
# allowed call ("allowed to TARGET") when the policy decides, before the service runs;
# handle_request logs a refusal ("denied") at once. qubesim adds the end, under the call's id.
WAIT_SERVICE = """#!/bin/sh
while [ ! -e /tmp/release ]; do sleep 0.1; done
exit 7
"""


def audit_lines(moment: datetime) -> list[str]:
    return run_tool("qubesim", "audit", "--since", moment.isoformat()).stdout.splitlines()


def audited(moment: datetime, wanted: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    """The one call since `moment` that `wanted` picks, once it is in the audit log."""
    deadline = time.monotonic() + 60
    while not (found := [entry for entry in audit_since(moment) if wanted(entry)]):
        assert time.monotonic() < deadline, "the call never reached the audit log"
        time.sleep(0.2)
    [entry] = found
    return entry


def test_a_running_call_is_audited_when_decided_and_again_when_it_ends(
    qvm: Qvm, policy: Policy, pair: tuple[str, str]
) -> None:
    source, target = pair
    install_service(qvm, target, "test.Wait", WAIT_SERVICE)
    path = policy(f"test.Wait * {source} {target} allow")
    started = datetime.now(UTC)
    running = subprocess.Popen(
        ["qvm-run", "--pass-io", source, f"qrexec-client-vm {target} test.Wait+long"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        entry = audited(started, lambda e: e["source"] == source)
        assert (entry["target"], entry["actual_target"], entry["service"], entry["argument"]) == (
            target,
            target,
            "test.Wait",
            "long",
        )
        assert (entry["decision"], entry["rule"], entry["exit_code"], entry["end_time"]) == (
            "allow",
            f"{path}:1",
            None,
            None,
        )
        assert running.poll() is None
        [line] = [line for line in audit_lines(started) if " test.Wait+long " in line]
        assert line.endswith(f" allow {path}:1 exit=running")
    finally:
        as_root(target, "touch /tmp/release")
        running.communicate(timeout=60)
    assert running.returncode == 7
    ended = audited(started, lambda e: e["call"] == entry["call"])
    assert (ended["time"], ended["exit_code"]) == (entry["time"], 7)
    assert str(ended["end_time"]) > str(ended["time"])
    [line] = [line for line in audit_lines(started) if " test.Wait+long " in line]
    assert line.endswith(" exit=7")


def test_a_running_call_from_dom0_is_audited_as_running(qvm: Qvm, appvm: str) -> None:
    started = datetime.now(UTC)
    waiting = "while [ ! -e /tmp/release ]; do sleep 0.1; done; exit 5"
    running = subprocess.Popen(
        ["qvm-run", "--pass-io", appvm, waiting], stdin=subprocess.DEVNULL, text=True
    )
    try:
        entry = audited(started, lambda e: e["target"] == appvm)
        assert (entry["source"], entry["service"], entry["decision"], entry["exit_code"]) == (
            "dom0",
            "qubes.VMShell",
            "allow",
            None,
        )
    finally:
        as_root(appvm, "touch /tmp/release")
        running.wait(timeout=60)
    assert audited(started, lambda e: e["call"] == entry["call"])["exit_code"] == 5


def test_concurrent_calls_keep_their_lines_whole_and_paired(
    qvm: Qvm, policy: Policy, pair: tuple[str, str]
) -> None:
    source, target = pair
    policy(f"test.Echo * {source} {target} allow")
    started = datetime.now(UTC)
    qvm(
        "qvm-run",
        "--pass-io",
        source,
        f"for i in $(seq 12); do qrexec-client-vm {target} test.Echo+$i >/dev/null & done; wait",
    )
    entries = [e for e in audit_since(started) if e["source"] == source]
    assert sorted(int(str(e["argument"])) for e in entries) == list(range(1, 13))
    assert all(e["exit_code"] == 0 and e["end_time"] for e in entries)
    calls = {str(e["call"]) for e in entries}
    assert len(calls) == 12
    # Every line of the log is whole; each of these calls has one decision and one end.
    events = [json.loads(line) for line in current().audit_log.read_text().splitlines()]
    ours = sorted((event["call"], event["event"]) for event in events if event.get("call") in calls)
    assert ours == sorted((call, kind) for call in calls for kind in ("decision", "end"))


def test_calls_from_dom0_are_audited(qvm: Qvm, appvm: str) -> None:
    started = datetime.now(UTC)
    time.sleep(0.01)
    qvm("qvm-run", "--pass-io", appvm, "exit 3", check=False)
    [entry] = [e for e in audit_since(started) if e["target"] == appvm]
    assert (entry["source"], entry["service"], entry["decision"], entry["exit_code"]) == (
        "dom0",
        "qubes.VMShell",
        "allow",
        3,
    )
