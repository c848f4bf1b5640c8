"""Integration tests run as root inside `qubesim dom0`, against the simulated host."""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from qubesim import world

Qvm = Callable[..., subprocess.CompletedProcess[str]]
POLICY_DIR = Path("/etc/qubes/policy.d")
_counter = itertools.count()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0 or shutil.which("qvm-run") is None:
        skip = pytest.mark.skip(reason="needs root inside `qubesim dom0` (see `make integration`)")
        for item in items:
            item.add_marker(skip)


def run_tool(
    *argv: str, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a dom0 command; on an unexpected failure show its output."""
    result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


@functools.cache
def host_info() -> dict[str, str]:
    """What `qubesim info` says of the simulated host the tests run on (`key: value` lines)."""
    lines = run_tool("qubesim", "info").stdout.splitlines()
    return dict(line.split(": ", 1) for line in lines)


def host_release() -> str:
    """The Qubes release of the host: tests whose behaviour differs by release assert that of
    the host they run on."""
    return host_info()["release"]


ROOT = Path(__file__).resolve().parents[2]
SIMULATED_INVENTORY = "inventory/qubesim/build_infra.yml"


def ansible(command: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """An Ansible command run from the checkout with its ansible.cfg, as a user would."""
    environment = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    return subprocess.run(
        [command, *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )


def site(*arguments: str, inventory: str = SIMULATED_INVENTORY) -> subprocess.CompletedProcess[str]:
    return ansible("ansible-playbook", "-i", inventory, "site.yml", *arguments)


def copy_inventory(directory: Path) -> Path:
    """The simulated example inventory copied into directory, without public keys a run may
    have exported next to it (Ansible would read an inventory directory's every file)."""
    source = (ROOT / SIMULATED_INVENTORY).parent
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("public-keys"))
    return directory


def changed_inventory(directory: Path, **settings: object) -> str:
    """The simulated example inventory copied into directory with its description changed by
    `settings` (build_infra_* variables, in a file of its group_vars/all read after the
    example's): the preflight refuses them given any other way, -e included. Returns the
    inventory file, for site(inventory=...)."""
    copy_inventory(directory)
    (directory / "group_vars/all/zz_changed.yml").write_text(json.dumps(settings))
    return str(directory / "build_infra.yml")


def install_artifact(place: Path, bin_directory: Path | None = None) -> Path:
    """Build the collection's artifact with ansible-galaxy (from bin_directory, or PATH) and
    install it into an empty collections path under place, which is returned."""
    galaxy = str(bin_directory / "ansible-galaxy") if bin_directory else "ansible-galaxy"
    run_tool(galaxy, "collection", "build", "--output-path", str(place), str(ROOT))
    (artifact,) = place.glob("qubes_infra-build-*.tar.gz")
    collections = place / "collections"
    # --force: the checkout's own copy of the collection counts as installed.
    install = [galaxy, "collection", "install", "--offline", "--force", "-p", str(collections)]
    run_tool(*install, str(artifact))
    return collections


def serve_release_configs(
    outside: world.World, place: Path, name: str, configs: dict[str, str]
) -> str:
    """A release configurations repository (file name -> text) of a test, served by the world's
    git daemon; returns its URL."""
    work = place / name
    for file, text in configs.items():
        (work / file).parent.mkdir(parents=True, exist_ok=True)
        (work / file).write_text(text)
    bare = outside.directory / "git" / f"{name}.git"
    shutil.rmtree(bare, ignore_errors=True)
    outside.run("git", "init", "--quiet", "--initial-branch=main", ".", cwd=work)
    outside.run("git", "add", "--all", cwd=work)
    outside.run("git", "commit", "--quiet", "-m", "release configurations", cwd=work)
    outside.run("git", "clone", "--quiet", "--bare", str(work), str(bare))
    return f"git://{world.LOOPBACK}:{world.GIT_PORT}/{name}.git"


def run_module(
    module: str, arguments: dict[str, object], *options: str
) -> subprocess.CompletedProcess[str]:
    """One module run in dom0 (`ansible localhost`), arguments given as JSON."""
    return ansible(
        "ansible",
        "localhost",
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        "ansible_python_interpreter={{ ansible_playbook_python }}",
        "-m",
        module,
        "-a",
        json.dumps(arguments),
        *options,
    )


def as_root(
    qube: str, command: str, *, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a shell command in a qube as root (qvm-run --user root), for setting tests up."""
    return run_tool(
        "qvm-run", "--pass-io", "--user", "root", qube, command, input=input, check=check
    )


@pytest.fixture
def qvm() -> Qvm:
    return run_tool


@pytest.fixture
def new_name() -> Iterator[Callable[[], str]]:
    """Fresh qube names for a test; whatever the test created is removed afterwards."""
    names: list[str] = []

    def make() -> str:
        name = f"t{os.getpid() % 10000}-{next(_counter)}"
        names.append(name)
        return name

    yield make
    # qvm-remove refuses a running qube, as Qubes does: what the test started is killed first.
    running = set(run_tool("qvm-ls", "--raw-list", "--running").stdout.split())
    if running & set(names):
        run_tool("qvm-kill", *sorted(running & set(names)), check=False)
    for name in reversed(names):
        run_tool("qvm-remove", "--force", name, check=False)


@pytest.fixture
def appvm(new_name: Callable[[], str]) -> str:
    name = new_name()
    run_tool("qvm-create", "--label", "red", name)
    return name


@pytest.fixture
def isolated_appvm(new_name: Callable[[], str]) -> str:
    name = new_name()
    run_tool("qvm-create", "--label", "blue", "--property", "netvm=", name)
    return name


Policy = Callable[..., Path]


@pytest.fixture
def policy() -> Iterator[Policy]:
    """Install policy files in dom0 for one test (name, lines); they are removed afterwards."""
    written: list[Path] = []

    def install(*lines: str, name: str = "30-qubesim-test.policy") -> Path:
        path = POLICY_DIR / name
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
        return path

    yield install
    for path in written:
        path.unlink(missing_ok=True)


def audit_since(moment: datetime) -> list[dict[str, object]]:
    output = subprocess.run(
        ["qubesim", "audit", "--json", "--since", moment.isoformat()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in output.splitlines()]


# -- the screen: questions qubes ask a person (zenity), answered here ------------------------------
def questions(qube: str | None = None) -> list[dict[str, object]]:
    """The questions on the screens of the running qubes (of `qube` only, if given), oldest
    first: id, time, qube (whose screen), caller (the calling qube it names), text, state."""
    output = run_tool("qubesim", "questions", "--json").stdout
    found = [json.loads(line) for line in output.splitlines()]
    return [question for question in found if qube is None or question["qube"] == qube]


def answer(question_id: object, reply: str) -> None:
    """Answer a pending question yes or no, as the person at the screen would."""
    run_tool("qubesim", "answer", str(question_id), reply)


def pending_question(qube: str, timeout: float = 60) -> dict[str, object]:
    """The one question waiting on `qube`'s screen, once it is there."""
    deadline = time.monotonic() + timeout
    while not (waiting := [q for q in questions(qube) if q["state"] == "pending"]):
        assert time.monotonic() < deadline, f"no question appeared on {qube}'s screen"
        time.sleep(0.2)
    [question] = waiting
    return question
