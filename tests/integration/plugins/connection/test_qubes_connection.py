"""The qubes connection plugin through ansible-playbook, against qubesim qubes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from ansible_collections.qubes_infra.build.plugins.connection.qubes import describe_failure
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_client import stream_session
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_transport import (
    ConnectFailure,
    Transport,
)

from tests.integration.conftest import Policy, Qvm, audit_since
from tests.integration.conftest import ansible as run_ansible

PLAYBOOKS = Path(__file__).parent / "playbooks"


def ansible(command: str, inventory: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return run_ansible(command, "-i", str(inventory), *arguments)


def write_inventory(path: Path, qubes: list[str], **variables: object) -> Path:
    lines = ["all:", "  hosts:"] + [f"    {qube}:" for qube in qubes]
    lines += ["  vars:", "    ansible_connection: qubes_infra.build.qubes"]
    lines += [f"    {key}: {value}" for key, value in variables.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def three_qubes(qvm: Qvm, new_name: Callable[[], str]) -> list[str]:
    names = [new_name() for _ in range(3)]
    for name in names:
        qvm("qvm-create", "--label", "green", "--property", "netvm=", name)
    return names


@pytest.mark.parametrize(("persist", "pipelining"), [(True, True), (False, True), (True, False)])
def test_every_operation(
    three_qubes: list[str], tmp_path: Path, persist: bool, pipelining: bool
) -> None:
    inventory = write_inventory(
        tmp_path / "hosts.yml",
        three_qubes[:1],
        ansible_qubes_persist=persist,
        ansible_pipelining=pipelining,
    )
    result = ansible(
        "ansible-playbook",
        inventory,
        str(PLAYBOOKS / "exercise.yml"),
        "-e",
        f"fetch_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    qube = three_qubes[0]
    fetched = tmp_path / qube / "odd name $NOT_SET `id` 'q' \"dq\" ünï.txt"
    assert fetched.read_text() == f"content for {qube}\n"
    # Idempotence through the plugin: a second run changes nothing.
    again = ansible(
        "ansible-playbook",
        inventory,
        str(PLAYBOOKS / "exercise.yml"),
        "-e",
        f"fetch_dir={tmp_path}",
    )
    assert "changed=1 " in again.stdout  # only the `touch` task, which always changes


def test_twenty_tasks_forks_five_three_qubes(three_qubes: list[str], tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path / "hosts.yml", three_qubes)
    result = ansible(
        "ansible-playbook", inventory, str(PLAYBOOKS / "many_tasks.yml"), "--forks", "5"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for qube in three_qubes:
        assert f"{qube}" in result.stdout
    assert result.stdout.count("failed=0") == 3


def test_200_megabyte_binary_round_trip(three_qubes: list[str], tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as out:
        for _ in range(200):
            out.write(os.urandom(1 << 20))
    inventory = write_inventory(tmp_path / "hosts.yml", three_qubes[:1])
    result = ansible(
        "ansible-playbook",
        inventory,
        str(PLAYBOOKS / "transfer.yml"),
        "-e",
        f"big_file={big}",
        "-e",
        f"fetch_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    assert hashlib.sha256((tmp_path / "out" / "big.bin").read_bytes()).hexdigest() == digest


def test_missing_qube_is_unreachable(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path / "hosts.yml", ["no-such-qube"])
    result = ansible("ansible", inventory, "all", "-m", "ping")
    assert result.returncode == 4  # unreachable
    assert "qube 'no-such-qube' does not exist" in result.stdout + result.stderr


def test_halted_qube_without_autostart_is_unreachable(
    three_qubes: list[str], tmp_path: Path
) -> None:
    inventory = write_inventory(
        tmp_path / "hosts.yml", three_qubes[:1], ansible_qubes_autostart=False
    )
    result = ansible("ansible", inventory, "all", "-m", "ping")
    assert result.returncode == 4
    assert "is not running and autostart is off" in result.stdout + result.stderr


def test_a_command_fails_as_itself(three_qubes: list[str], tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path / "hosts.yml", three_qubes[:1])
    result = ansible("ansible", inventory, "all", "-m", "command", "-a", "sh -c 'exit 7'")
    assert result.returncode == 2  # failed, not unreachable
    assert "rc=7" in result.stdout


def test_command_timeout_kills_the_remote_work(
    qvm: Qvm, three_qubes: list[str], tmp_path: Path
) -> None:
    qube = three_qubes[0]
    inventory = write_inventory(tmp_path / "hosts.yml", [qube], ansible_qubes_command_timeout=3)
    result = ansible("ansible", inventory, "all", "-m", "command", "-a", "sleep 1111")
    assert result.returncode == 2
    assert "timed out after 3 seconds" in result.stdout + result.stderr
    left = qvm("qvm-run", "--pass-io", qube, "pgrep -x sleep || echo none").stdout
    assert left == "none\n"


def test_persistent_mode_makes_one_qrexec_call(
    qvm: Qvm, three_qubes: list[str], tmp_path: Path
) -> None:
    """Many tasks, one stream: the audit log shows one qubes.VMShell call to the qube (its
    decision is written when the stream opens, its end when the qube shuts down under it)."""
    qube = three_qubes[0]
    started = datetime.now(UTC)
    inventory = write_inventory(tmp_path / "hosts.yml", [qube], ansible_qubes_persist_idle=30)
    result = ansible("ansible-playbook", inventory, str(PLAYBOOKS / "many_tasks.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    qvm("qvm-shutdown", "--wait", qube)
    deadline = time.monotonic() + 30
    while not (calls := [e for e in audit_since(started) if e["target"] == qube]):
        assert time.monotonic() < deadline, "the stream's call never reached the audit log"
        time.sleep(0.1)
    assert [e["service"] for e in calls] == ["qubes.VMShell"]


def _stream_through(admin: str, target: str) -> list[str]:
    """What the plugin runs in an admin qube, started here inside that qube."""
    return ["qvm-run", "--pass-io", admin, f"exec qrexec-client-vm {target} qubes.VMShell"]


def test_admin_qube_stream_runs_tasks_when_policy_allows(
    qvm: Qvm, new_name: Callable[[], str], policy: Policy
) -> None:
    admin, target = new_name(), new_name()
    for name in (admin, target):
        qvm("qvm-create", "--label", "black", "--property", "netvm=", name)
    policy(f"qubes.VMShell * {admin} {target} allow")
    transport = Transport(_stream_through(admin, target), timeout=60)
    try:
        session = stream_session(transport)
        result = session.run("hostname; id -un")
        assert bytes(result.stdout).split() == [target.encode(), b"user"]
    finally:
        transport.close()


def test_admin_qube_stream_refused_by_policy_is_told_apart(
    qvm: Qvm, new_name: Callable[[], str], policy: Policy
) -> None:
    admin, target = new_name(), new_name()
    for name in (admin, target):
        qvm("qvm-create", "--label", "black", "--property", "netvm=", name)
    policy(f"qubes.VMShell * {admin} {target} deny")
    with pytest.raises(ConnectFailure) as failure:
        Transport(_stream_through(admin, target), timeout=60)
    # From an admin qube there is no qvm-check: the verdict rests on the exit code alone.
    reason = describe_failure(
        target, failure.value.returncode, failure.value.stderr.decode(), True, None
    )
    assert reason == f"qrexec policy refused the shell service to qube {target!r}"
