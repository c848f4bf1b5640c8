"""qvm-run: exit codes, autostart, users, services, streaming and concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.conftest import Qvm, as_root, host_release


def test_exit_code_of_the_command_is_passed_through(qvm: Qvm, appvm: str) -> None:
    assert qvm("qvm-run", "--pass-io", appvm, "exit 7", check=False).returncode == 7
    assert qvm("qvm-run", "--pass-io", appvm, "false", check=False).returncode == 1


def test_unknown_qube_exits_2(qvm: Qvm) -> None:
    result = qvm("qvm-run", "--pass-io", "no-such-qube", "true", check=False)
    assert result.returncode == 2
    assert "no such domain: 'no-such-qube'" in result.stderr


def test_no_autostart_on_a_halted_qube_exits_1(qvm: Qvm, appvm: str) -> None:
    result = qvm("qvm-run", "--no-autostart", "--pass-io", appvm, "true", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
    assert qvm("qvm-check", "--running", appvm, check=False).returncode == 1


def test_autostart_starts_a_halted_qube(qvm: Qvm, appvm: str) -> None:
    assert qvm("qvm-run", "--pass-io", appvm, "echo up").stdout == "up\n"
    assert qvm("qvm-check", "--running", appvm).returncode == 0


def test_user_root_and_root_shell_service(qvm: Qvm, appvm: str) -> None:
    assert as_root(appvm, "id -u").stdout == "0\n"
    # qubes.VMRootShell is root by itself from 4.3 only (test_releases.py says where upstream
    # states it); on 4.2 it is root when asked for
    root_shell = ["qvm-run", "--pass-io", "--user", "root", "--service", appvm]
    shell = qvm(*root_shell, "qubes.VMRootShell", input="id -u\n")
    assert shell.stdout == "0\n"
    shell = qvm("qvm-run", "--pass-io", "--service", appvm, "qubes.VMRootShell", input="id -u\n")
    assert shell.stdout == ("0\n" if host_release() == "4.3" else "1000\n")
    shell = qvm("qvm-run", "--pass-io", "--service", appvm, "qubes.VMShell", input="id -u\n")
    assert shell.stdout == "1000\n"
    assert qvm("qvm-run", "--pass-io", appvm, "sudo -n id -u").stdout == "0\n"


def test_vmshell_reads_data_after_the_command_line(qvm: Qvm, appvm: str) -> None:
    """The property Ansible relies on: a command and its input share the shell's stdin."""
    script = "head -c 5 > /tmp/got; cat /tmp/got; exit 3\nHELLOand-never-executed: rm -rf ~\n"
    result = qvm(
        "qvm-run", "--pass-io", "--service", appvm, "qubes.VMShell", input=script, check=False
    )
    assert (result.returncode, result.stdout) == (3, "HELLO")


def test_missing_service_exits_127(qvm: Qvm, appvm: str) -> None:
    result = qvm("qvm-run", "--pass-io", "--service", appvm, "no.Such.Service", check=False)
    assert result.returncode == 127


def test_stderr_is_kept_apart(qvm: Qvm, appvm: str) -> None:
    result = qvm("qvm-run", "--pass-io", appvm, "echo out; echo err >&2")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_100_megabytes_round_trip_in_bounded_memory(qvm: Qvm, appvm: str, tmp_path: Path) -> None:
    source = tmp_path / "random"
    with source.open("wb") as out:
        for _ in range(100):
            out.write(os.urandom(1 << 20))
    qvm("qvm-start", appvm)
    # A separate interpreter runs qvm-run, so that the peak RSS of qvm-run is measured alone.
    measure = (
        "import hashlib, json, resource, subprocess, sys\n"
        "digest = hashlib.sha256()\n"
        "with open(sys.argv[1], 'rb') as data:\n"
        "    process = subprocess.Popen(['qvm-run', '--pass-io', sys.argv[2], 'cat'],"
        " stdin=data, stdout=subprocess.PIPE)\n"
        "    for chunk in iter(lambda: process.stdout.read(1 << 16), b''):\n"
        "        digest.update(chunk)\n"
        "print(json.dumps({'rc': process.wait(), 'sha256': digest.hexdigest(),"
        " 'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", measure, str(source), appvm],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(output.stdout)
    assert result["rc"] == 0
    assert result["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert result["peak_kib"] < 64 * 1024, "qvm-run must stream, not hold the data"


def test_binary_data_flows_both_ways_through_a_command(qvm: Qvm, appvm: str) -> None:
    data = bytes(range(256)) * 1024
    result = subprocess.run(
        ["qvm-run", "--pass-io", appvm, "cat; printf '\\000\\377'"],
        input=data,
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == data + b"\x00\xff"


def test_twenty_concurrent_calls(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-start", appvm)
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(
            pool.map(lambda n: qvm("qvm-run", "--pass-io", appvm, f"echo {n}"), range(20))
        )
    assert [result.stdout for result in results] == [f"{n}\n" for n in range(20)]


def test_twenty_concurrent_autostarts_of_one_halted_qube(qvm: Qvm, appvm: str) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(
            pool.map(
                lambda _: qvm("qvm-run", "--pass-io", appvm, "cat /proc/1/stat | cut -d' ' -f1"),
                range(20),
            )
        )
    assert {result.stdout for result in results} == {"1\n"}


def test_kill_stops_every_process(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-run", "--pass-io", appvm, "sleep 1017 >/dev/null 2>&1 & true")
    qvm("qvm-kill", appvm)
    assert qvm("qvm-check", "--running", appvm, check=False).returncode == 1
    assert "sleep 1017" not in subprocess.run(["ps", "ax"], capture_output=True, text=True).stdout
