"""playbooks/verify.yml on the converged example: one table of every post-installation check,
all ok; each rule broken in turn (then restored) is named with its fix, and the play fails."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import (
    ROOT,
    SIMULATED_INVENTORY,
    ansible,
    as_root,
    changed_inventory,
    run_tool,
)
from tests.integration.converged.chain import BUILDER, Chain, in_qube

ROW = re.compile(r"^(\S+)\s{2,}(.+?)\s{2,}(ok|FAIL)\s{2,}(.*)$")
RELEASE_CONF = f"{BUILDER}/release-configs/R4.2/qubes-os-r4.2-host.conf"
UPLOAD_HOST = "upload.qubesim.invalid"


@dataclass
class Report:
    returncode: int
    rows: dict[tuple[str, str], tuple[str, str]]  # (qube, check) -> (ok or FAIL, detail)
    output: str

    @property
    def failed(self) -> dict[tuple[str, str], str]:
        return {key: detail for key, (result, detail) in self.rows.items() if result == "FAIL"}


def table_rows(stdout: str) -> dict[tuple[str, str], tuple[str, str]]:
    """The rows of the table the report task prints (a list of strings in the default callback)."""
    rows = {}
    for line in stdout.splitlines():
        quoted = line.strip().rstrip(",")
        if not (quoted.startswith('"') and quoted.endswith('"')):
            continue
        try:
            match = ROW.match(json.loads(quoted))
        except (json.JSONDecodeError, TypeError):
            continue
        if match:
            qube, check, result, detail = match.groups()
            rows[(qube, check)] = (result, detail)
    return rows


def verify(chain: Chain, *arguments: str, inventory: str = SIMULATED_INVENTORY) -> Report:
    result = ansible("ansible-playbook", "-i", inventory, "playbooks/verify.yml",
                     "-e", f"@{chain.variables}", *arguments)  # fmt: skip
    return Report(result.returncode, table_rows(result.stdout), result.stdout + result.stderr)


@pytest.fixture(scope="module")
def baseline(chain: Chain) -> Report:
    report = verify(chain)
    assert report.returncode == 0, report.output
    return report


def test_the_converged_example_passes_every_check(baseline: Report) -> None:
    assert baseline.failed == {}
    assert "all 37 checks ok" in baseline.output
    for qube in ("build-fedora", "build-kernel"):
        for check in (
            "no other secret key",
            "upload ssh key",
            f"ssh user {UPLOAD_HOST}",
            f"known_hosts {UPLOAD_HOST}",
            f"{BUILDER} at pin",
            f"{BUILDER} signed tag",
            "builder.conf no NO_SIGN",
            "builder.conf SIGN_KEY",
            "builder.conf DISTS_VM ?=",
            "builder.conf DIST_DOM0 ?=",
            "builder.conf COMPONENTS ?=",
            "builder.conf builder-github",
            "builder.conf LINUX_REPO_BASEDIR",
            "builder.conf includes builder-github.conf",
        ):
            assert baseline.rows[(qube, check)][0] == "ok"
    for check in ("logs key public, trusted", "logs key secret", "no other secret key",
                  "deploy key", "set-aside logs"):  # fmt: skip
        assert baseline.rows[("build-logs", check)][0] == "ok"
    assert baseline.rows[("keys-fedora", "signing key")][0] == "ok"
    assert baseline.rows[("dom0", "private volume build-fedora")] == ("ok", "20GiB")
    assert baseline.rows[("dom0", "policy flow matrix")][0] == "ok"


@contextmanager
def file_in_qube(qube: str, path: str) -> Iterator[None]:
    """Whatever the test does to a qube's file (as its user) is undone afterwards."""
    saved = in_qube(qube, f"cat {path}")
    assert saved.returncode == 0, saved.stderr
    mode = in_qube(qube, f"stat -c %a {path}").stdout.strip()
    try:
        yield
    finally:
        in_qube(qube, f"cat > {path} && chmod {mode} {path}", input=saved.stdout)


@contextmanager
def secret_key_in_build_qube(chain: Chain) -> Iterator[None]:
    made = in_qube(
        "build-fedora",
        "gpg --batch --passphrase '' --quick-gen-key 'stray key' ed25519 sign never"
        " && gpg --with-colons --list-secret-keys 'stray key'",
    )
    assert made.returncode == 0, made.stderr
    stray = next(line.split(":")[9] for line in made.stdout.splitlines() if line[:4] == "fpr:")
    try:
        yield
    finally:
        in_qube("build-fedora", f"gpg --batch --yes --delete-secret-and-public-key {stray}")


@contextmanager
def checkout_moved(chain: Chain) -> Iterator[None]:
    pin = str(chain.world.variables()["build_vm_builder_commit"])
    moved = in_qube("build-kernel", f"git -C {BUILDER} -c user.name=u -c user.email=u@x "
                    "commit --quiet --allow-empty -m moved")  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    try:
        yield
    finally:
        in_qube("build-kernel", f"git -C {BUILDER} reset --quiet --hard {pin}")


def release_conf_edit(command: str) -> Callable[[Chain], contextmanager[None]]:
    """A shell command run on the release configuration builder.conf links to ({conf})."""

    @contextmanager
    def edit(chain: Chain) -> Iterator[None]:
        with file_in_qube("build-fedora", RELEASE_CONF):
            changed = in_qube("build-fedora", command.format(conf=RELEASE_CONF))
            assert changed.returncode == 0, changed.stderr
            yield

    return edit


@contextmanager
def builder_github_left_out(chain: Chain) -> Iterator[None]:
    """Neither the release configuration nor ~/builder-github.conf (which adds it, as the Salt
    formula's does) builds builder-github."""
    with (
        file_in_qube("build-fedora", "~/builder-github.conf"),
        release_conf_edit("sed -i 's/ builder-github//g' {conf}")(chain),
    ):
        in_qube("build-fedora", "sed -i '/^COMPONENTS += builder-github$/d' ~/builder-github.conf")
        yield


@contextmanager
def builder_github_conf_signs_with_another_key(chain: Chain) -> Iterator[None]:
    with file_in_qube("build-fedora", "~/builder-github.conf"):
        in_qube("build-fedora", "sed -i 's/^SIGN_KEY = .*/SIGN_KEY = 00000000000000000000"
                "00000000000000000000/' ~/builder-github.conf")  # fmt: skip
        yield


def mode_0644(qube: str, path: str) -> Callable[[Chain], contextmanager[None]]:
    @contextmanager
    def loosen(chain: Chain) -> Iterator[None]:
        as_root(qube, f"chmod 0644 {path}")
        try:
            yield
        finally:
            as_root(qube, f"chmod 0600 {path}")

    return loosen


@contextmanager
def host_key_forgotten(chain: Chain) -> Iterator[None]:
    with file_in_qube("build-kernel", "~/.ssh/known_hosts"):
        in_qube("build-kernel", f"ssh-keygen -R {UPLOAD_HOST} -f ~/.ssh/known_hosts")
        yield


@contextmanager
def ssh_user_overridden(chain: Chain) -> Iterator[None]:
    with file_in_qube("build-kernel", "~/.ssh/config"):
        in_qube("build-kernel", f"sed -i '1i Host {UPLOAD_HOST}\\n    User intruder' ~/.ssh/config")
        yield


@contextmanager
def exported_key_of_another_env(chain: Chain) -> Iterator[None]:
    """The controller's copy of keys-kernel's public key is keys-fedora's: keys-kernel and its
    build qube do not hold or sign with that key."""
    exported = chain.public_keys / "keys-kernel.asc"
    saved = exported.read_bytes()
    shutil.copyfile(chain.public_keys / "keys-fedora.asc", exported)
    try:
        yield
    finally:
        exported.write_bytes(saved)


@contextmanager
def nothing(chain: Chain) -> Iterator[None]:
    yield


def larger_volume(directory: Path) -> str:
    """The inventory with build-fedora's private volume asked 30GiB (in the inventory's files:
    the preflight refuses build_infra_envs given with -e)."""
    group_vars = ROOT / "inventory/qubesim/group_vars/all/build_infra.yml"
    envs = yaml.safe_load(group_vars.read_text())["build_infra_envs"]
    envs["fedora"]["volume_size"] = "30GiB"
    return changed_inventory(directory / "inventory", build_infra_envs=envs)


@dataclass(frozen=True)
class Case:
    """A rule broken, the checks verify.yml runs for it (tags and qubes, as a user would limit
    them), and the rows that must fail with a piece of their fix."""

    breaking: Callable[[Chain], contextmanager[None]]
    tags: str
    qubes: tuple[str, ...]
    expected: dict[tuple[str, str], str]
    inventory: Callable[[Path], str] | None = None

    def scope(self) -> tuple[str, ...]:
        return ("--tags", self.tags, "--limit", ",".join(("dom0", *self.qubes)))


FEDORA, KERNEL = ("build-fedora",), ("build-kernel",)
CASES = {
    "secret key in a build qube": Case(
        secret_key_in_build_qube, "build", FEDORA,
        {("build-fedora", "no other secret key"): "gpg --delete-secret-keys"},
    ),
    "checkout moved": Case(
        checkout_moved, "build", KERNEL,
        {
            ("build-kernel", f"{BUILDER} at pin"): "move the checkout away",
            ("build-kernel", f"{BUILDER} signed tag"): "trust its signer",
        },
    ),
    "NO_SIGN": Case(
        release_conf_edit("echo 'NO_SIGN ?= 1' >> {conf}"), "build", FEDORA,
        {("build-fedora", "builder.conf no NO_SIGN"): "NO_SIGN is 1: remove it"},
    ),
    "DISTS_VM forced": Case(
        release_conf_edit("sed -i 's/^DISTS_VM ?=/DISTS_VM :=/' {conf}"), "build", FEDORA,
        {("build-fedora", "builder.conf DISTS_VM ?="): "DISTS_VM :=: set it with DISTS_VM ?="},
    ),
    "builder-github not built": Case(
        builder_github_left_out, "build", FEDORA,
        {("build-fedora", "builder.conf builder-github"): "add builder-github to COMPONENTS"},
    ),
    "LINUX_REPO_BASEDIR unset": Case(
        release_conf_edit("sed -i '/^LINUX_REPO_BASEDIR/d' {conf}"), "build", FEDORA,
        {("build-fedora", "builder.conf LINUX_REPO_BASEDIR"): "set LINUX_REPO_BASEDIR"},
    ),
    "builder-github.conf not included": Case(
        release_conf_edit("sed -i '/^include/d' {conf}"), "build", FEDORA,
        {
            ("build-fedora", "builder.conf includes builder-github.conf"): "add include",
            # SIGN_KEY came from there too.
            ("build-fedora", "builder.conf SIGN_KEY"): "SIGN_KEY is unset",
        },
    ),
    "SIGN_KEY of another key": Case(
        builder_github_conf_signs_with_another_key, "build", FEDORA,
        {("build-fedora", "builder.conf SIGN_KEY"): "run the build_vm role (SIGN_KEY in"},
    ),
    "deploy key 0644": Case(
        mode_0644("build-logs", "/home/user/.ssh/build-logs-deploy-key"), "logs", ("build-logs",),
        {("build-logs", "deploy key"): "mode 644: give build_logs_deploy_key"},
    ),
    "upload key 0644": Case(
        mode_0644("build-kernel", "/home/user/.ssh/id_ed25519"), "build", KERNEL,
        {("build-kernel", "upload ssh key"): "mode 644: give build_vm_upload_ssh_key"},
    ),
    "host key forgotten": Case(
        host_key_forgotten, "build", KERNEL,
        {("build-kernel", f"known_hosts {UPLOAD_HOST}"): "lacks its host key"},
    ),
    "ssh user overridden": Case(
        ssh_user_overridden, "build", KERNEL,
        {("build-kernel", f"ssh user {UPLOAD_HOST}"): "ssh logs in as intruder, not root"},
    ),
    "signing key not in its keys qube": Case(
        exported_key_of_another_env, "keys,build", ("keys-kernel", "build-kernel"),
        {
            ("keys-kernel", "signing key"): "is not here",
            ("build-kernel", "builder.conf SIGN_KEY"): "run the build_vm role",
        },
    ),
    "volume smaller than the inventory's": Case(
        nothing, "volumes", (),
        {("dom0", "private volume build-fedora"): "20GiB, want 30GiB: run the dom0 role"},
        larger_volume,
    ),
    # A wrong policy flow: tests/integration/roles/test_dom0_flows.py (verify.yml --tags flows).
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_a_broken_rule_is_named_with_its_fix(
    chain: Chain, baseline: Report, name: str, tmp_path: Path
) -> None:
    case = CASES[name]
    inventory = case.inventory(tmp_path) if case.inventory else SIMULATED_INVENTORY
    with case.breaking(chain):
        report = verify(chain, *case.scope(), inventory=inventory)
    assert report.returncode != 0
    assert set(report.failed) == set(case.expected), report.failed
    for row, fix in case.expected.items():
        assert fix in report.failed[row], report.failed[row]
    assert f"{len(case.expected)} of {len(report.rows)} checks FAIL" in report.output
    # The same checks pass again once the rule is restored.
    assert verify(chain, *case.scope()).returncode == 0


def test_a_qube_that_cannot_be_reached_is_a_failed_row(chain: Chain, baseline: Report) -> None:
    run_tool("qvm-shutdown", "--wait", "keys-kernel")
    # The keys qubes' checks only: dom0's own (the flows) say nothing about reaching a qube.
    scope = ("--tags", "keys", "--limit", "dom0,keys-kernel")
    report = verify(chain, "-e", "ansible_qubes_autostart=false", *scope)
    assert report.returncode != 0
    assert report.failed == {
        ("keys-kernel", "reachable"): "not reachable: start it (qvm-start keys-kernel) or check"
        " the inventory"
    }
