"""A refused inventory fails the run: every refusal of the data model reaches the user as a
non-zero exit whose output names the environment, the key and the rule, and nothing on the host
changes. From a checkout ansible.cfg makes an unparsed inventory fatal; installed from the
artifact, with the user's own ansible.cfg, the playbooks' preflight play refuses to run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import (
    ROOT,
    SIMULATED_INVENTORY,
    copy_inventory,
    install_artifact,
    run_tool,
)

Variables = dict[str, Any]


def _rename_kernel_to_logs(variables: Variables) -> None:
    variables["build_infra_envs"]["logs"] = variables["build_infra_envs"].pop("kernel")


def _long_env_name(variables: Variables) -> None:
    variables["build_infra_envs"]["a" * 27] = variables["build_infra_envs"].pop("kernel")


def _misspelt_key(variables: Variables) -> None:
    variables["build_infra_envs"]["fedora"]["volume_sise"] = "20GiB"


def _malformed_size(variables: Variables) -> None:
    variables["build_infra_envs"]["fedora"]["volume_size"] = "20 gigs"


def _builder_without_release(variables: Variables) -> None:
    del variables["build_infra_envs"]["fedora"]["builders"][0]["release"]


# (change to the example's group_vars, what the user must read: env and key, then the rule)
REFUSALS: dict[str, tuple[Callable[[Variables], None], str, str]] = {
    "logs-collision": (
        _rename_kernel_to_logs,
        "build_infra_envs.fedora.logs: 'build-logs'",
        "is also the build qube of env 'logs'",
    ),
    "name-too-long": (
        _long_env_name,
        f"build_infra_envs.{'a' * 27}: the build qube name",
        "is longer than 31 characters",
    ),
    "unknown-key": (
        _misspelt_key,
        "build_infra_envs.fedora: unknown key 'volume_sise'",
        "(allowed: ",
    ),
    "malformed-size": (
        _malformed_size,
        "build_infra_envs.fedora.volume_size: size '20 gigs'",
        "must be a positive number",
    ),
    "builder-without-release": (
        _builder_without_release,
        "build_infra_envs.fedora.builders[0].release: None",
        "must look like 4.2",
    ),
}


def _write_inventory(directory: Path, change: Callable[[Variables], None]) -> Path:
    """The simulated example inventory with one change to its group_vars, in directory."""
    copy_inventory(directory)
    variables_file = directory / "group_vars/all/build_infra.yml"
    variables = yaml.safe_load(variables_file.read_text())
    change(variables)
    variables_file.write_text(yaml.safe_dump(variables))
    return directory


def _host_state() -> tuple[str, dict[str, str]]:
    """What a run could have changed: the qubes and dom0's policy files."""
    qubes = run_tool("qvm-ls", "--raw-list").stdout
    policy = {
        str(path): path.read_text()
        for path in Path("/etc/qubes/policy.d").rglob("*")
        if path.is_file()
    }
    return qubes, policy


def _playbook(*arguments: str, cwd: Path, config: Path | None) -> subprocess.CompletedProcess[str]:
    """ansible-playbook as a user runs it: with the given ansible.cfg and no inventory from the
    environment (qubesim's dom0 sets a default one; a user's shell does not)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    if config is not None:
        environment["ANSIBLE_CONFIG"] = str(config)
    return subprocess.run(
        ["ansible-playbook", *arguments],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    for text in expected:
        assert text in output, output


@pytest.fixture(scope="module")
def user_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout as a user has it: ansible.cfg, site.yml and the collection (the same link tree
    that `make bootstrap` makes); each test writes its own inventory/ into a copy."""
    checkout = tmp_path_factory.mktemp("checkout")
    for name in ("ansible.cfg", "site.yml"):
        shutil.copy(ROOT / name, checkout / name)
    (checkout / ".collections").symlink_to(ROOT / ".collections")
    return checkout


@pytest.fixture(scope="module")
def installed_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection built as an artifact and installed, with a user's own ansible.cfg that
    knows nothing of this repository's settings. Returns that ansible.cfg."""
    place = tmp_path_factory.mktemp("installed")
    collections = install_artifact(place)
    config = place / "ansible.cfg"
    config.write_text(f"[defaults]\ncollections_path = {collections}\n")
    return config


@pytest.fixture
def unchanged_host() -> Iterator[None]:
    before = _host_state()
    yield
    assert _host_state() == before


@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_refused_group_vars_fail_the_run_from_a_checkout(
    refusal: str, tmp_path: Path, user_checkout: Path, unchanged_host: None
) -> None:
    change, where, rule = REFUSALS[refusal]
    inventory = _write_inventory(tmp_path / "inventory", change)
    # Given with -i, as a directory.
    with_option = _playbook("-i", str(inventory), "site.yml", cwd=ROOT, config=ROOT / "ansible.cfg")
    _assert_refused(with_option, where, rule, "Completely failed to parse inventory source")
    # The checkout's default inventory (ansible.cfg: inventory/build_infra.yml), no -i at all.
    checkout = tmp_path / "checkout"
    shutil.copytree(user_checkout, checkout, symlinks=True)
    _write_inventory(checkout / "inventory", change)
    by_default = _playbook("site.yml", cwd=checkout, config=checkout / "ansible.cfg")
    _assert_refused(by_default, where, rule, "Completely failed to parse inventory source")


@pytest.mark.parametrize("playbook", ["qubes_infra.build.site", "qubes_infra.build.verify"])
def test_installed_playbooks_refuse_a_refused_inventory(
    playbook: str, tmp_path: Path, installed_collection: Path, unchanged_host: None
) -> None:
    change, where, rule = REFUSALS["logs-collision"]
    inventory = _write_inventory(tmp_path / "inventory", change)
    result = _playbook("-i", str(inventory), playbook, cwd=tmp_path, config=installed_collection)
    _assert_refused(
        result,
        where,
        rule,
        "The inventory does not describe the build infrastructure: no host 'dom0'",
        "no host in group build_vms",
    )


def test_installed_preflight_accepts_the_example(
    tmp_path: Path, installed_collection: Path
) -> None:
    result = _playbook(
        "-i",
        str(ROOT / SIMULATED_INVENTORY),
        "qubes_infra.build.preflight",
        cwd=tmp_path,
        config=installed_collection,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed=0" in result.stdout


def test_installed_playbooks_refuse_a_limit_while_an_unparsed_inventory_only_warns(
    tmp_path: Path, installed_collection: Path, unchanged_host: None
) -> None:
    """Under --limit the preflight play is left out (localhost is outside the limit), so a refused
    inventory would give a run that matches no host and exits 0: a limited run needs Ansible's
    setting that makes an unparsed inventory fatal."""
    inventory = ("-i", str(ROOT / SIMULATED_INVENTORY))
    for playbook in ("qubes_infra.build.site", "qubes_infra.build.verify"):
        limited = _playbook(*inventory, playbook, "--limit", "env_fedora", cwd=tmp_path,
                            config=installed_collection)  # fmt: skip
        _assert_refused(limited, "--limit needs [inventory] any_unparsed_is_failed = true")
        assert re.search(r"changed=[1-9]", limited.stdout) is None, limited.stdout
    config = tmp_path / "ansible.cfg"
    fatal = "[inventory]\nany_unparsed_is_failed = true\n"
    config.write_text(installed_collection.read_text() + fatal)
    checked = _playbook(*inventory, "qubes_infra.build.preflight", "--limit", "env_fedora",
                        cwd=tmp_path, config=config)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- one description per run: build_infra_* from anywhere but the inventory's files ----------------
OTHER_ENVS = {"build_infra_envs": {"fedora": {}, "debian": {}}}


def _unchanged(variables: Variables) -> None:
    pass


def _refused_before_any_change(
    result: subprocess.CompletedProcess[str], host: str, source: str
) -> None:
    _assert_refused(
        result,
        f"Refused before anything changes: build_infra_envs for {host} comes from {source}",
        "Put the build_infra_* settings only in",
    )
    # The preflight stopped the run: no play after it started.
    assert "Dom0 | Qubes and qrexec policy" not in result.stdout, result.stdout


def test_environments_given_with_e_at_a_file_are_refused(
    tmp_path: Path, unchanged_host: None
) -> None:
    """The defect of issue 22: `-e @envs.yml` naming fedora and debian, while the inventory
    makes fedora's and kernel's hosts, would create debian's qubes and configure kernel's."""
    inventory = _write_inventory(tmp_path / "inventory", _unchanged)
    envs = tmp_path / "envs.yml"
    envs.write_text(yaml.safe_dump(OTHER_ENVS))
    result = _playbook("-i", str(inventory), "-e", f"@{envs}", "site.yml", cwd=ROOT,
                       config=ROOT / "ansible.cfg")  # fmt: skip
    for host in ("dom0", "build-kernel", "keys-fedora"):
        _refused_before_any_change(result, host, f"extra vars (-e @{envs})")


def test_environments_in_a_host_vars_file_are_refused(tmp_path: Path, unchanged_host: None) -> None:
    inventory = _write_inventory(tmp_path / "inventory", _unchanged)
    host_vars = inventory / "host_vars" / "dom0.yml"
    host_vars.parent.mkdir()
    host_vars.write_text(yaml.safe_dump(OTHER_ENVS))
    result = _playbook("-i", str(inventory), "site.yml", cwd=ROOT, config=ROOT / "ansible.cfg")
    _refused_before_any_change(result, "dom0", f"the host_vars file {host_vars}")


def test_environments_in_the_vars_of_a_wrapper_playbook_are_refused(
    tmp_path: Path, user_checkout: Path, unchanged_host: None
) -> None:
    """A playbook of the user's that imports site.yml with `vars:` (import_playbook takes no
    vars_files: a vars file reaches site.yml's plays only as -e @FILE, the first test)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(user_checkout, checkout, symlinks=True)
    _write_inventory(checkout / "inventory", _unchanged)
    (checkout / "wrapper.yml").write_text(
        yaml.safe_dump([{"import_playbook": "site.yml", "vars": OTHER_ENVS}])
    )
    result = _playbook("wrapper.yml", cwd=checkout, config=checkout / "ansible.cfg")
    _refused_before_any_change(result, "dom0", "play vars (vars: of the play")
