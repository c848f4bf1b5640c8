"""The build_vm role's qubesbuilder.TriggerBuild, run as qrexec runs it (a process with the
qrexec environment and the argument), against builder directories on a temp dir: the world's
stand-in of qubes-builder (its Makefile answers `get-var`) with a builder.conf per test, and an
auto-build that records what it built and can be held until the test lets it finish."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.services import SERVICES
from tests.unit.services.qrexec_call import call_service

WORLD_BUILDER = SERVICES.parent / "qubesim/world_builder"
TRIGGER = SERVICES / "trigger_build.py"
# A build that records itself, then waits until the test creates DIR/release-COMPONENT.
RECORDING_BUILD = """#!/bin/sh
here=$(cd "$(dirname "$0")/.." && pwd)
echo "start $1" >> "$here/built"
while [ ! -e "$here/release-$1" ]; do sleep 0.05; done
echo "end $1" >> "$here/built"
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def wait_for(condition: object, what: str, seconds: float = 60) -> None:
    """Poll until condition() holds; a generous bound only says the thing never happened."""
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.05)


def make_builder(directory: Path, builder_conf: str) -> Path:
    """The world's stand-in of qubes-builder with this builder.conf and a recording build."""
    shutil.copytree(WORLD_BUILDER, directory)
    (directory / "builder.conf").write_text(builder_conf)
    build = directory / "scripts/auto-build"
    build.write_text(RECORDING_BUILD)
    build.chmod(0o755)
    return directory


@dataclass
class Qube:
    """A build qube's home on a temp dir: settings, builders.list, logs."""

    home: Path
    config: Path

    @property
    def logs(self) -> Path:
        return self.home / "builder-github-logs"

    def settings(self, **changes: object) -> None:
        values = json.loads(self.config.read_text())
        values.update(changes)
        self.config.write_text(json.dumps(values))

    def builders(self, *lines: str) -> None:
        (self.home / "builders.list").write_text("".join(f"{line}\n" for line in lines))

    def call(
        self, program: Path, *argv: str, source: str = "sys-net", data: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        environment = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.home),
            "BUILD_SERVICES_CONFIG": str(self.config),
            "QREXEC_REMOTE_DOMAIN": source,
        }
        return call_service(program, argv, data, environment)

    def decisions(self) -> list[str]:
        """The services' decision lines, oldest call first."""
        if not self.logs.is_dir():
            return []
        files = sorted(
            (p for p in self.logs.iterdir() if p.name.count("-") == 1),
            key=lambda p: (p.stat().st_mtime_ns, p.name),
        )
        return [line for path in files for line in path.read_text().splitlines()]

    def action_logs(self) -> list[Path]:
        return sorted(p for p in self.logs.iterdir() if p.name.count("-") > 1)


def make_qube(tmp_path: Path) -> Qube:
    """A build qube's home whose services let sys-net call them (builders.list format 1)."""
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "build-services.json"
    config.write_text(
        json.dumps(
            {
                "builders_list": str(home / "builders.list"),
                "logs_directory": str(home / "builder-github-logs"),
                "keyring": str(home / "trusted-keys-for-commands.gpg"),
                "used_commands": str(home / "state/used-commands.json"),
                "callers": ["sys-net"],
            }
        )
    )
    return Qube(home, config)


@pytest.fixture
def qube(tmp_path: Path) -> Qube:
    return make_qube(tmp_path)


@pytest.fixture
def builders(tmp_path: Path, qube: Qube) -> Iterator[tuple[Path, Path]]:
    """Two builders: one knows core-admin and linux-kernel (from qubes-linux-kernel-latest),
    the other gui-daemon."""
    first = make_builder(
        tmp_path / "builder-a",
        "COMPONENTS = core-admin linux-kernel\n"
        "GIT_URL_linux_kernel = https://github.com/QubesOS/qubes-linux-kernel-latest.git\n",
    )
    second = make_builder(tmp_path / "builder-b", "COMPONENTS = gui-daemon\n")
    qube.builders(f"r4.2={first}", f"r4.3={second}")
    yield first, second
    # Let every build the test left waiting end, so that no process outlives it.
    for builder in (first, second):
        for name in ("core-admin", "linux-kernel", "gui-daemon"):
            (builder / f"release-{name}").touch()


def built(builder: Path) -> list[str]:
    path = builder / "built"
    return path.read_text().splitlines() if path.exists() else []


def runner_pid(decision: str) -> int:
    """The process a "runner of DIR ... started: process PID" decision names."""
    match = re.search(r"runner of .* started: process ([0-9]+)$", decision)
    assert match, decision
    return int(match[1])


def trigger_processes(qube: Qube) -> list[int]:
    """The live processes of trigger_build.py run for this qube (calls and runners)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            environment = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone, or not ours
        mine = f"BUILD_SERVICES_CONFIG={qube.config}".encode() in environment.split(b"\0")
        if str(TRIGGER).encode() in command and mine and state != "Z":
            found.append(int(entry.name))
    return found


def pending_builds(qube: Qube) -> list[str]:
    """The pending builds of every builder, as builder-key/component."""
    root = qube.home / ".local/state/qubesbuilder/triggers"
    return sorted(f"{p.parent.parent.name}/{p.name}" for p in root.glob("*/pending/*"))


@contextlib.contextmanager
def holding_lock(builder: Path) -> Iterator[None]:
    """The builder's lock, held by the test as another action would hold it."""
    with open(builder / "builder.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def flood(qube: Qube, component: str, calls: int) -> None:
    """`calls` triggers of component at once, as a hostile net qube may send them."""
    environment = {
        "PATH": os.environ["PATH"],
        "HOME": str(qube.home),
        "BUILD_SERVICES_CONFIG": str(qube.config),
        "QREXEC_REMOTE_DOMAIN": "sys-net",
    }
    started = [
        subprocess.Popen(
            ["python3", str(TRIGGER), component],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(calls)
    ]
    assert [call.wait(timeout=120) for call in started] == [0] * calls


def test_a_build_starts_detached_in_the_builder_that_knows_the_component(
    qube: Qube, builders: tuple[Path, Path]
) -> None:
    first, second = builders
    result = qube.call(TRIGGER, "core-admin")
    assert result.returncode == 0 and result.stdout == b"", result.stderr
    pending, runner = qube.decisions()
    assert f"from sys-net: build of core-admin pending in {first} (release 4.2, log " in pending
    assert runner.endswith(f"runner of {first} (release 4.2) started: process {runner_pid(runner)}")
    # The call returned with its build's log made, while the build still waits for the test:
    # it runs detached.
    [output] = qube.action_logs()
    assert output.name.endswith("-core-admin-4.2.log") and str(output) in pending
    wait_for(lambda: built(first) == ["start core-admin"], "the build")
    assert built(second) == []
    (first / "release-core-admin").touch()
    wait_for(lambda: built(first) == ["start core-admin", "end core-admin"], "the end")
    wait_for(lambda: "done" in output.read_text(), "the build's last log line")
    wait_for(lambda: trigger_processes(qube) == [], "the runner's end")


def test_the_repository_name_finds_its_component(qube: Qube, builders: tuple[Path, Path]) -> None:
    """qubes-builder-github's TriggerBuild: GIT_URL_<component> basename without qubes-."""
    first, _ = builders
    assert qube.call(TRIGGER, "linux-kernel-latest").returncode == 0
    wait_for(lambda: built(first) == ["start linux-kernel"], "the build of linux-kernel")


def test_an_unknown_component_builds_nothing(qube: Qube, builders: tuple[Path, Path]) -> None:
    first, second = builders
    assert qube.call(TRIGGER, "core-agent-linux").returncode == 0
    assert qube.decisions()[-1].endswith("no builder knows core-agent-linux: nothing to build")
    assert built(first) == built(second) == []


@pytest.mark.parametrize(
    ("argv", "rule"),
    [
        (["core/admin"], "outside [A-Za-z0-9_-]"),
        (["core.admin"], "outside [A-Za-z0-9_-]"),
        (["core admin"], "outside [A-Za-z0-9_-]"),
        (["core+admin"], "outside [A-Za-z0-9_-]"),
        (["c" * 65], "of 65 characters"),
        (["-x"], "starts with '-'"),
        (["--help"], "starts with '-'"),
        ([""], "of 0 characters"),
        ([], "exactly one argument, got 0"),
        (["core-admin", "gui-daemon"], "exactly one argument, got 2"),
    ],
)
def test_a_bad_argument_never_reaches_a_build(
    qube: Qube, builders: tuple[Path, Path], argv: list[str], rule: str
) -> None:
    result = qube.call(TRIGGER, *argv)
    assert result.returncode == 1
    [decision] = qube.decisions()
    assert "refused from sys-net: malformed argument" in decision and rule in decision
    assert all(built(builder) == [] for builder in builders)


def test_sixty_four_characters_are_a_name(qube: Qube, builders: tuple[Path, Path]) -> None:
    assert qube.call(TRIGGER, "c" * 64).returncode == 0
    assert qube.decisions()[-1].endswith("nothing to build")


def test_a_caller_other_than_the_net_qube_is_refused(
    qube: Qube, builders: tuple[Path, Path]
) -> None:
    result = qube.call(TRIGGER, "core-admin", source="build-kernel")
    assert result.returncode == 1
    [decision] = qube.decisions()
    assert decision.endswith(
        "qubesbuilder.TriggerBuild: refused: caller 'build-kernel' is not allowed"
    )
    assert built(builders[0]) == []


def test_one_build_at_a_time_per_builder(qube: Qube, builders: tuple[Path, Path]) -> None:
    first, _ = builders
    assert qube.call(TRIGGER, "core-admin").returncode == 0
    wait_for(lambda: built(first) == ["start core-admin"], "the first build")
    assert qube.call(TRIGGER, "linux-kernel").returncode == 0
    second_log = next(p for p in qube.action_logs() if "linux-kernel" in p.name)
    assert "runner of" not in qube.decisions()[-1]  # the builder's runner takes it
    assert "holding" not in second_log.read_text()
    assert built(first) == ["start core-admin"]
    (first / "release-core-admin").touch()
    wait_for(lambda: built(first)[-1:] == ["start linux-kernel"], "the second build")
    assert built(first) == ["start core-admin", "end core-admin", "start linux-kernel"]
    assert "holding" in second_log.read_text()


def test_a_build_waits_for_whoever_holds_the_builder_lock(
    qube: Qube, builders: tuple[Path, Path]
) -> None:
    """The lock is flock(2) on DIR/builder.lock, the one qubes-builder-github's `flock -x` takes."""
    first, _ = builders
    (first / "release-core-admin").touch()
    with open(first / "builder.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert qube.call(TRIGGER, "core-admin").returncode == 0
        [output] = qube.action_logs()
        wait_for(lambda: "waiting for" in output.read_text(), "the wait")
        assert built(first) == []
    wait_for(lambda: built(first) == ["start core-admin", "end core-admin"], "the build")


def test_a_qubes_builderv2_line_is_not_a_builder(tmp_path: Path, qube: Qube) -> None:
    """The collection does not run qubes-builderv2 yet: a builders.list line of its format,
    rRELEASE=DIR=CONFIG, names no builder (the role writes format 1 only), even when DIR is a
    qubes-builder that knows the component."""
    builder = make_builder(tmp_path / "builder", "COMPONENTS = core-admin\n")
    qube.builders(f"r4.3={builder}=builder.yml")
    assert qube.call(TRIGGER, "core-admin").returncode == 0
    assert qube.decisions()[-1].endswith("no builder knows core-admin: nothing to build")
    assert built(builder) == []


# A build that writes down the build log command it was started with.
LOG_COMMAND_BUILD = """#!/bin/sh
here=$(cd "$(dirname "$0")/.." && pwd)
printf '%s\\n' "${QUBES_BUILD_LOG_CMD-unset}" > "$here/log-command"
"""


@pytest.mark.parametrize(
    ("setting", "seen"),
    [("qrexec-client-vm dom0 qubesbuilder.BuildLog", "qrexec-client-vm dom0 qubesbuilder.BuildLog"),
     ("", "unset")],
)  # fmt: skip
def test_the_build_runs_with_the_build_log_command(
    tmp_path: Path, qube: Qube, setting: str, seen: str
) -> None:
    """QUBES_BUILD_LOG_CMD is in the environment of the build's script, as builder-github
    exports it (qubes-builder's make-with-log reads it there only); empty: not set at all."""
    builder = make_builder(tmp_path / "builder", "COMPONENTS = core-admin\n")
    (builder / "scripts/auto-build").write_text(LOG_COMMAND_BUILD)
    qube.builders(f"r4.2={builder}")
    qube.settings(build_log_command=setting)
    assert qube.call(TRIGGER, "core-admin").returncode == 0
    written = builder / "log-command"
    wait_for(written.exists, "the build")
    wait_for(lambda: written.read_text() == f"{seen}\n", "the whole line")


def test_a_flood_of_triggers_leaves_one_runner_and_one_pending_build(
    qube: Qube, builders: tuple[Path, Path]
) -> None:
    """50 triggers of a component at once, while its builder is busy: one process is left (the
    builder's runner), one build is pending, and it runs once when the builder is free."""
    first, _ = builders
    with holding_lock(first):
        flood(qube, "core-admin", 50)
        decisions = qube.decisions()
        assert sum("build of core-admin pending in" in line for line in decisions) == 1
        assert sum("build of core-admin already pending in" in line for line in decisions) == 49
        [started] = [line for line in decisions if "runner of" in line]
        assert trigger_processes(qube) == [runner_pid(started)]
        [pending] = pending_builds(qube)
        assert pending.endswith("/core-admin")
        [output] = qube.action_logs()
        assert all(str(output) in line for line in decisions if "core-admin" in line)
        wait_for(lambda: "waiting for" in output.read_text(), "the runner's wait")
        assert built(first) == []
    (first / "release-core-admin").touch()
    wait_for(lambda: trigger_processes(qube) == [], "the runner's end")
    assert built(first) == ["start core-admin", "end core-admin"]
    assert pending_builds(qube) == []


def test_a_trigger_during_its_build_builds_it_again_after(
    qube: Qube, builders: tuple[Path, Path]
) -> None:
    """The running build may have fetched the sources before the push: triggers that come while
    it runs make one more build, after it."""
    first, _ = builders
    assert qube.call(TRIGGER, "core-admin").returncode == 0
    wait_for(lambda: built(first) == ["start core-admin"], "the first build")
    assert pending_builds(qube) == []  # it left the pending set before it started
    assert qube.call(TRIGGER, "core-admin").returncode == 0
    assert qube.call(TRIGGER, "core-admin").returncode == 0
    decisions = qube.decisions()
    assert "build of core-admin pending in" in decisions[-2]
    assert "build of core-admin already pending in" in decisions[-1]
    assert len(trigger_processes(qube)) == 1
    (first / "release-core-admin").touch()
    wait_for(lambda: trigger_processes(qube) == [], "the runner's end")
    assert built(first) == ["start core-admin", "end core-admin"] * 2
    first_log, second_log = qube.action_logs()
    assert first_log.read_text().count("done") == second_log.read_text().count("done") == 1


def test_the_pending_builds_of_a_killed_runner_are_built_after_the_next_trigger(
    qube: Qube, builders: tuple[Path, Path]
) -> None:
    """A runner killed while it waits for the builder leaves its pending builds; the next call
    of the qube, whatever component it names, starts a runner for them."""
    first, second = builders
    with holding_lock(first):
        assert qube.call(TRIGGER, "core-admin").returncode == 0
        assert qube.call(TRIGGER, "linux-kernel").returncode == 0
        killed = runner_pid(qube.decisions()[1])
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: trigger_processes(qube) == [], "the runner's death")
        assert [p.rsplit("/", 1)[1] for p in pending_builds(qube)] == ["core-admin", "linux-kernel"]
        (second / "release-gui-daemon").touch()
        assert qube.call(TRIGGER, "gui-daemon").returncode == 0
        restarted = [line for line in qube.decisions()[-3:] if f"runner of {first} " in line]
        assert len(restarted) == 1 and runner_pid(restarted[0]) != killed
    (first / "release-core-admin").touch()
    (first / "release-linux-kernel").touch()
    wait_for(lambda: trigger_processes(qube) == [], "the runners' end")
    assert built(first) == [
        "start core-admin", "end core-admin", "start linux-kernel", "end linux-kernel"
    ]  # fmt: skip
    assert built(second) == ["start gui-daemon", "end gui-daemon"]


def test_one_runner_builds_the_components_of_its_builder_in_the_order_they_came(
    qube: Qube, builders: tuple[Path, Path]
) -> None:
    """Several components pending in one builder: one runner builds each once, oldest first,
    while another builder's runner builds its own beside it."""
    first, second = builders
    for name in ("core-admin", "linux-kernel"):
        (first / f"release-{name}").touch()
    (second / "release-gui-daemon").touch()
    with holding_lock(first):
        for name in ("linux-kernel", "core-admin", "linux-kernel-latest", "core-admin"):
            assert qube.call(TRIGGER, name).returncode == 0
        assert len(pending_builds(qube)) == 2
        assert qube.call(TRIGGER, "gui-daemon").returncode == 0
        wait_for(lambda: built(second) == ["start gui-daemon", "end gui-daemon"], "gui-daemon")
        assert built(first) == []
        assert len(trigger_processes(qube)) == 1
    wait_for(lambda: trigger_processes(qube) == [], "the runner's end")
    assert built(first) == [
        "start linux-kernel", "end linux-kernel", "start core-admin", "end core-admin"
    ]  # fmt: skip
    assert sum("runner of" in line for line in qube.decisions()) == 2


@pytest.mark.parametrize("name", ["core-admin\n", "core-admin\r", "\ncore-admin"])
def test_a_name_with_a_line_end_is_refused(
    qube: Qube, builders: tuple[Path, Path], name: str
) -> None:
    """The name is matched whole: a trailing newline does not pass as the end of the name."""
    result = qube.call(TRIGGER, name)
    assert result.returncode == 1
    [decision] = qube.decisions()
    assert "malformed argument" in decision and "outside [A-Za-z0-9_-]" in decision
    assert pending_builds(qube) == []
