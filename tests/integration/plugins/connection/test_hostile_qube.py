"""The plugin against a compromised qube: a hostile agent of our own (hostile_agent.py) stands in
front of the qube's python3 and answers the plugin's protocol maliciously. Each case asserts a
bound: the run ends, the task fails or the host is unreachable with a clear reason, memory and
disk stay under their caps, and other qubes are unaffected. Every Ansible run here is guarded by
an outer timeout and by memory and file-size limits, so that a regression fails the test instead
of exhausting the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from ansible.release import __version__ as ansible_version

from tests.integration.conftest import ROOT, Qvm, as_root
from tests.integration.plugins.connection.test_qubes_connection import PLAYBOOKS, write_inventory

HOSTILE_AGENT = Path(__file__).with_name("hostile_agent.py")
MIB = 1 << 20
# Limits on the Ansible run under test: address space per process, size of any file it writes.
ADDRESS_SPACE = 3 << 30
FILE_SIZE = 256 * MIB
# Runs the command with the limits, then reports the peak RSS of its processes (KiB).
GUARD = """
import resource, subprocess, sys
def limit():
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]),) * 2)
code = subprocess.run(sys.argv[3:], preexec_fn=limit).returncode
sys.stderr.write("\\npeak_rss_kib=%d\\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


@dataclass
class Run:
    returncode: int
    output: str
    seconds: float
    peak_rss: int


def guarded(*argv: str, timeout: float = 240, path: str | None = None) -> Run:
    """An Ansible command from the checkout, killed (with every process of its session) if it
    has not ended after timeout seconds."""
    environment = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
    }
    if path is not None:
        environment["PATH"] = path
    command = [sys.executable, "-c", GUARD, str(ADDRESS_SPACE), str(FILE_SIZE), *argv]
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{argv[0]} did not end within {timeout} s:\n{stdout}{stderr}")
    seconds = time.monotonic() - started
    body, _, peak = stderr.rpartition("peak_rss_kib=")
    return Run(process.returncode, stdout + body, seconds, int(peak or 0) * 1024)


def make_hostile(qube: str, mode: str) -> None:
    """Root in the qube puts the hostile agent in front of python3 (it lasts until the qube
    restarts: an AppVM's root file system is the template's again after that)."""
    as_root(
        qube,
        "mkdir -p /usr/local/bin && cat > /usr/local/bin/python3"
        " && chmod 755 /usr/local/bin/python3",
        input=HOSTILE_AGENT.read_text(),
    )
    as_root(qube, f"echo {mode} > /etc/hostile-agent-mode")


@pytest.fixture
def new_qube(qvm: Qvm, new_name: Callable[[], str]) -> Callable[[], str]:
    def create() -> str:
        name = new_name()
        qvm("qvm-create", "--label", "red", "--property", "netvm=", name)
        return name

    return create


def inventory(tmp_path: Path, qubes: list[str], **variables: object) -> str:
    variables.setdefault("ansible_python_interpreter", "/usr/bin/python3")
    return str(write_inventory(tmp_path / "hosts.yml", qubes, **variables))


def adhoc(
    tmp_path: Path,
    qubes: list[str],
    module: str,
    arguments: str | dict[str, object] | None = None,
    *,
    path: str | None = None,
    **variables: object,
) -> Run:
    """One module on the qubes (`ansible all -m MODULE -a ARGUMENTS`), guarded."""
    argv = ["ansible", "-i", inventory(tmp_path, qubes, **variables), "all", "-m", module]
    if arguments is not None:
        argv += ["-a", arguments if isinstance(arguments, str) else json.dumps(arguments)]
    return guarded(*argv, path=path)


def processes_naming(name: str) -> list[str]:
    """Command lines on this host that mention name (a qube's unique name)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if name in argv and entry.name != str(os.getpid()):
            found.append(argv)
    return found


# -- 1. facts never choose the connection ---------------------------------------------------------
def test_facts_ansible_drops_do_not_move_the_next_task(
    new_qube: Callable[[], str], qvm: Qvm, tmp_path: Path
) -> None:
    target, other = new_qube(), new_qube()
    planted = {"ansible_host": other, "ansible_user": "root", "ansible_connection": "local"}
    result = guarded(
        "ansible-playbook",
        "-v",
        "-i",
        inventory(tmp_path, [target]),
        str(PLAYBOOKS / "planted_facts.yml"),
        "-e",
        json.dumps({"planted": planted}),
    )
    assert result.returncode == 0, result.output
    assert f"ran in {target} as user" in result.output


def test_facts_naming_the_plugins_variables_are_refused(
    new_qube: Callable[[], str], qvm: Qvm, tmp_path: Path
) -> None:
    """Before this was refused, the next task ran in `other`, as root, with no timeout."""
    target, other, healthy = new_qube(), new_qube(), new_qube()
    planted = {
        "ansible_qubes_name": other,
        "ansible_qubes_command_timeout": 0,
        "ansible_qubes_transport": "qvm-run",
    }
    result = guarded(
        "ansible-playbook",
        "-v",
        "-i",
        inventory(
            tmp_path, [target, healthy], ansible_user="root", ansible_qubes_command_timeout=60
        ),
        str(PLAYBOOKS / "planted_facts.yml"),
        "-e",
        json.dumps({"planted": planted}),
        "-e",
        json.dumps({"planted_for": target}),
    )
    # The host is out of the play: unreachable from ansible-core 2.17 on (the refusal comes from
    # the option-resolution hook), failed on 2.16 (it comes when the task's variables are handed
    # to the connection); either way before anything runs.
    refused = 4 if tuple(map(int, ansible_version.split(".")[:2])) >= (2, 17) else 2
    assert result.returncode == refused, result.output
    assert (
        f"host '{target}': its facts set ansible_qubes_command_timeout, ansible_qubes_name,"
        " ansible_qubes_transport, which only the inventory may set" in result.output
    )
    assert f"ran in {healthy} as root" in result.output  # the other host goes on
    assert f"ran in {other}" not in result.output
    for qube in (target, other):
        assert as_root(qube, "test -e /tmp/reached", check=False).returncode == 1


# -- 2. every wait is bounded ---------------------------------------------------------------------
def test_garbage_handshake_is_unreachable_promptly_beside_a_healthy_qube(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    hostile, healthy = new_qube(), new_qube()
    make_hostile(hostile, "garbage")
    result = guarded(
        "ansible-playbook",
        "-i",
        inventory(tmp_path, [hostile, healthy], ansible_qubes_connect_timeout=5),
        "--forks",
        "2",
        str(PLAYBOOKS / "hostile.yml"),
    )
    assert result.returncode == 4, result.output  # unreachable
    assert (
        f"qube '{hostile}': it answered the handshake with something else than the agent"
        in result.output
    )
    assert f"ok: [{healthy}]" in result.output  # its start has a lock of its own
    assert result.seconds < 60  # generous: connect_timeout is 5 s; before, it never ended


def test_a_qube_that_stops_reading_loses_its_stream_and_nothing_is_left_behind(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    """A command with large input to a qube that never reads: the write is bounded by
    connect_timeout, the host becomes unreachable, and the multiplexer and qvm-run end."""
    hostile = new_qube()
    make_hostile(hostile, "deaf")
    result = guarded(
        "ansible-playbook",
        "-i",
        inventory(
            tmp_path, [hostile], ansible_qubes_connect_timeout=5, ansible_qubes_persist_idle=2
        ),
        str(PLAYBOOKS / "large_input.yml"),
    )
    assert result.returncode == 4, result.output
    assert hostile in result.output
    assert _no_process_left(hostile)


def test_an_interrupted_run_leaves_no_process_behind(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    hostile = new_qube()
    make_hostile(hostile, "deaf")
    hosts = inventory(
        tmp_path, [hostile], ansible_qubes_connect_timeout=30, ansible_qubes_persist_idle=2
    )
    environment = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    process = subprocess.Popen(
        ["ansible-playbook", "-i", hosts, str(PLAYBOOKS / "large_input.yml")],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not any("qubes_multiplexer" in argv for argv in processes_naming(hostile)):
        assert time.monotonic() < deadline, "the multiplexer never started"
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert _no_process_left(hostile, within=90)


def _no_process_left(qube: str, within: float = 60) -> bool:
    deadline = time.monotonic() + within
    while processes_naming(qube):
        if time.monotonic() > deadline:
            print(processes_naming(qube))
            return False
        time.sleep(0.5)
    return True


def test_a_transfer_to_a_qube_that_stops_reading_times_out(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    hostile = new_qube()
    make_hostile(hostile, "deaf-on-put")
    source = tmp_path / "big"
    source.write_bytes(b"x" * (32 * MIB))
    result = adhoc(
        tmp_path,
        [hostile],
        "ansible.builtin.copy",
        {"src": str(source), "dest": "/tmp/big"},
        ansible_qubes_transfer_timeout=3,
        ansible_qubes_connect_timeout=60,
    )
    assert result.returncode != 0, result.output
    assert f"to qube '{hostile}' took more than 3 seconds (transfer_timeout)" in result.output


# -- 3. caps ---------------------------------------------------------------------------------------
def test_an_endless_output_flood_ends_the_task_under_default_settings(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    hostile = new_qube()
    make_hostile(hostile, "flood-output")
    result = adhoc(tmp_path, [hostile], "ansible.builtin.command", "true")
    assert result.returncode == 2, result.output
    assert (
        f"command in qube '{hostile}' returned more than 64 MiB of output (output_limit)"
        in result.output
    )
    assert 0 < result.peak_rss < 1 << 30


def test_an_endless_fetch_stops_at_its_limit_and_leaves_no_file(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    hostile = new_qube()
    make_hostile(hostile, "flood-fetch")
    destination = tmp_path / "fetched"
    result = adhoc(
        tmp_path,
        [hostile],
        "ansible.builtin.fetch",
        {"src": "/etc/hostname", "dest": f"{destination}/", "flat": True},
        ansible_qubes_fetch_limit=16,
    )
    assert result.returncode == 2, result.output
    assert f"/etc/hostname in qube '{hostile}' is larger than 16 MiB (fetch_limit)" in result.output
    assert not destination.exists() or list(destination.iterdir()) == []


# -- 4. what the qube says is printable; malformed frames are unreachable ------------------------
@pytest.mark.parametrize("mode", ["nested-exit", "huge-exit", "typed-exit"])
def test_malformed_frames_make_the_qube_unreachable(
    new_qube: Callable[[], str], tmp_path: Path, mode: str
) -> None:
    hostile = new_qube()
    make_hostile(hostile, mode)
    result = adhoc(tmp_path, [hostile], "ansible.builtin.ping")
    assert result.returncode == 4, result.output
    assert f"qube '{hostile}': malformed message from the qube" in result.output
    assert "Traceback" not in result.output


def test_error_text_from_the_qube_reaches_the_operator_printable(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    hostile = new_qube()
    make_hostile(hostile, "escapes-on-put")
    result = adhoc(tmp_path, [hostile], "ansible.builtin.copy", {"content": "x", "dest": "/tmp/x"})
    assert result.returncode == 2, result.output
    assert "?[31mFORGED" in result.output
    assert "\x1b" not in result.output and "\x07" not in result.output


def test_stderr_at_connect_is_quoted_not_believed(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    hostile = new_qube()
    make_hostile(hostile, "lying-stderr")
    result = adhoc(tmp_path, [hostile], "ansible.builtin.ping")
    assert result.returncode == 4, result.output
    assert f"could not reach qube '{hostile}' (exit 1); it said: " in result.output
    assert "does not exist" not in result.output
    assert "\x1b" not in result.output


# -- 5. a halted qube, told by dom0 and not by the transport's words -------------------------------
def test_halted_qube_is_told_apart_when_the_transport_says_nothing(
    new_qube: Callable[[], str], tmp_path: Path
) -> None:
    """A real dom0's `qvm-run --no-autostart` exits 1 silently for a halted qube
    (qubes-core-admin-client, qubesadmin/tools/qvm_run.py, main); a qvm-run that drops its stderr
    stands in for it here."""
    qube = new_qube()
    shims = tmp_path / "bin"
    shims.mkdir()
    silent = shims / "qvm-run"
    silent.write_text(f'#!/bin/sh\nexec {shutil.which("qvm-run")} "$@" 2>/dev/null\n')
    silent.chmod(0o755)
    result = adhoc(
        tmp_path,
        [qube],
        "ansible.builtin.ping",
        path=f"{shims}:{os.environ['PATH']}",
        ansible_qubes_autostart=False,
    )
    assert result.returncode == 4, result.output
    assert f"qube '{qube}' is not running and autostart is off" in result.output
