"""Benchmark of the qubes connection plugin, run inside `qubesim dom0` (see `make bench`).

One run measures, side by side on the same simulated host: the same playbook (60 tasks on each of
3 qubes, forks 3) with `connection: local` in dom0 (the floor), this plugin one-shot, this plugin
persistent and community.general.qubes, at QUBESIM_QREXEC_DELAY_MS 0 and 100; then a 1 GiB put and
fetch: by the same playbook with the local connection (the floor), through the persistent plugin,
and through the plugin alone. It prints wall times, qrexec calls per task, transfer rates, peak
memory and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
QUBES = ("bench-1", "bench-2", "bench-3")
TASKS_PER_HOST = 60
COMMUNITY = HERE.parents[0] / ".collections"


@dataclass(frozen=True)
class Mode:
    name: str
    variables: dict[str, object]


MODES = (
    Mode(
        "local (floor)",
        {
            "ansible_connection": "local",
            "ansible_pipelining": True,
            "ansible_python_interpreter": "{{ ansible_playbook_python }}",
        },
    ),
    Mode(
        "qubes one-shot",
        {"ansible_connection": "qubes_infra.build.qubes", "ansible_qubes_persist": False},
    ),
    Mode(
        "qubes persistent",
        {"ansible_connection": "qubes_infra.build.qubes", "ansible_qubes_persist_idle": 2},
    ),
    Mode(
        "community.general.qubes",
        {"ansible_connection": "community.general.qubes", "ansible_user": "root"},
    ),
)


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def community_general() -> Path:
    """community.general from the `ansible` package on PyPI, unpacked once (no second core)."""
    target = COMMUNITY / "ansible_collections" / "community" / "general"
    if not target.exists():
        with tempfile.TemporaryDirectory() as download:
            run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-d",
                    download,
                    "ansible>=12,<13",
                ]
            )
            [wheel] = Path(download).glob("ansible-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                members = [
                    n
                    for n in archive.namelist()
                    if n.startswith("ansible_collections/community/general/")
                ]
                archive.extractall(COMMUNITY, members)
    return COMMUNITY


def prepare_qubes() -> None:
    for qube in QUBES:
        if subprocess.run(["qvm-check", "--quiet", qube]).returncode != 0:
            run(["qvm-create", "--label", "gray", qube])
        run(["qvm-start", "--skip-if-running", qube])


def inventory(directory: Path, mode: Mode) -> Path:
    path = directory / "hosts.json"
    hosts = {qube: {} for qube in QUBES}
    path.write_text(json.dumps({"all": {"hosts": hosts, "vars": mode.variables}}))
    return path


def audit_calls(since: datetime) -> int:
    output = run(["qubesim", "audit", "--json", "--since", since.isoformat()]).stdout
    return sum(1 for line in output.splitlines() if json.loads(line)["target"] in QUBES)


def ansible_environment(delay_ms: int) -> dict[str, str]:
    collections = f"{ROOT / '.collections'}:{community_general()}"
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": collections,
        "ANSIBLE_FORKS": "3",
        "QUBESIM_QREXEC_DELAY_MS": str(delay_ms),
    }


def measure(mode: Mode, delay_ms: int, directory: Path) -> tuple[float, float]:
    """Wall seconds of the playbook, and qrexec calls per task."""
    started = datetime.now(UTC)
    begin = time.monotonic()
    run(
        ["ansible-playbook", "-i", str(inventory(directory, mode)), str(HERE / "playbook.yml")],
        env=ansible_environment(delay_ms),
        cwd=ROOT,
    )
    seconds = time.monotonic() - begin
    # Every call is in the audit log from its decision on, a persistent stream's too.
    return seconds, audit_calls(started) / (TASKS_PER_HOST * len(QUBES))


def peak_rss_kib(pattern: str) -> int:
    """The highest peak RSS among running processes whose command line contains pattern."""
    peak = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            command = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ")
            if pattern.encode() in command:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                peak = max(peak, int(fields["VmHWM"].split()[0]))
        except (OSError, KeyError, ValueError):
            continue
    return peak


def run_measured(argv: list[str], **kwargs: object) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB of the process and the children it waited for, stdout)."""
    begin = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]
    output = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - begin
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({process.returncode}):\n{output}")
    return seconds, usage.ru_maxrss, output


def transfer_playbook(
    directory: Path, variables: dict[str, object], big: Path
) -> tuple[float, int]:
    """The transfer playbook (copy, fetch, remove) on the first qube with these variables. The
    fetched copy goes before the next run: fetch skips a destination that is already equal."""
    fetched = directory / "back.bin"
    fetched.unlink(missing_ok=True)
    path = directory / "hosts.json"
    path.write_text(json.dumps({"all": {"hosts": {QUBES[0]: {}}, "vars": variables}}))
    seconds, rss, _output = run_measured(
        [
            "ansible-playbook",
            "-i",
            str(path),
            str(HERE / "transfer.yml"),
            "-e",
            f"big_file={big}",
            "-e",
            f"fetch_to={fetched}",
        ],
        env=ansible_environment(0),
        cwd=ROOT,
    )
    fetched.unlink()
    return seconds, rss


def transfer(directory: Path, size_mib: int) -> None:
    """The same file put and fetched three ways: the playbook with the local connection (the
    floor: Ansible's copy and fetch, checksums included, without any channel), the same playbook
    through this plugin, and this plugin alone (put_file and fetch_file, no module around them)."""
    big = directory / "big.bin"
    with big.open("wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(size_mib):
            out.write(block)
    remote_local = directory / "local"
    remote_local.mkdir()
    plugin = {"ansible_connection": "qubes_infra.build.qubes", "ansible_qubes_persist_idle": 30}
    local = {**MODES[0].variables, "remote_dir": str(remote_local)}
    rows = {
        "playbook, connection: local (floor)": transfer_playbook(directory, local, big),
        "playbook, this plugin (persistent)": transfer_playbook(directory, plugin, big),
    }
    seconds, rss, output = run_measured(
        [
            sys.executable,
            str(HERE / "plugin_transfer.py"),
            QUBES[0],
            str(big),
            "/home/user/bench-alone.bin",
            str(directory / "alone.bin"),
        ],
        env=ansible_environment(0),
        cwd=ROOT,
    )
    alone = json.loads(output)
    rows["this plugin alone (put_file + fetch_file)"] = (alone["put"] + alone["fetch"], rss)
    multiplexer = peak_rss_kib(".ansible/cp/qubes-")
    agent = run(
        [
            "qvm-run",
            "--pass-io",
            QUBES[0],
            "grep VmHWM /proc/$(pgrep -f 'sys.stdin.buffer.read' | head -1)/status",
        ]
    ).stdout.split()[1]
    floor = rows["playbook, connection: local (floor)"][0]
    print(f"\n{size_mib} MiB put + fetch")
    print(f"{'path':44} {'s':>6} {'MiB/s':>6} {'x floor':>8} {'peak RSS MiB':>13}")
    for name, (seconds, rss) in rows.items():
        print(
            f"{name:44} {seconds:6.1f} {2 * size_mib / seconds:6.0f} {seconds / floor:8.2f}"
            f" {rss / 1024:13.0f}"
        )
    print(
        f"plugin alone: put {alone['put']:.1f} s, fetch {alone['fetch']:.1f} s;"
        f" peak RSS: multiplexer {multiplexer / 1024:.0f} MiB,"
        f" agent in the qube {int(agent) / 1024:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--delays",
        default="0,100",
        help="QUBESIM_QREXEC_DELAY_MS values (empty: no playbook timing)",
    )
    parser.add_argument("--transfer-mib", type=int, default=1024)
    arguments = parser.parse_args()
    prepare_qubes()
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        for delay in (int(value) for value in arguments.delays.split(",") if value):
            results = {mode.name: measure(mode, delay, directory) for mode in MODES}
            floor = results[MODES[0].name][0]
            community = results[MODES[3].name][0]
            shape = f"{TASKS_PER_HOST} tasks x {len(QUBES)} qubes, forks 3"
            print(f"\nQUBESIM_QREXEC_DELAY_MS={delay}: {shape}")
            print(f"{'mode':26} {'wall s':>8} {'calls/task':>11} {'x floor':>8} {'CG / this':>10}")
            for name, (seconds, calls) in results.items():
                print(
                    f"{name:26} {seconds:8.1f} {calls:11.2f} {seconds / floor:8.2f}"
                    f" {community / seconds:10.2f}"
                )
        if arguments.transfer_mib:
            transfer(directory, arguments.transfer_mib)


if __name__ == "__main__":
    main()
