"""The preflight play refuses, before any play changes anything, the settings the roles refuse:
admin qubes the dom0 role would not let into its policy, and qubes-builderv2 (which the
collection cannot run yet). Run with ansible-playbook on a copy of the example inventory; every
task of the play runs on the controller (delegated to localhost), so no qube is contacted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
V2_REFUSED = (
    "build_vm_builder_version: 2 (for {qube}) is not supported: qubes-builderv2 needs a"
    " disposable template and Admin API policy this collection does not create yet; use 1."
)


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    """The example inventory (build-fedora, build-kernel, sys-net...) in a folder of its own."""
    shutil.copytree(
        ROOT / "inventory", tmp_path / "inventory", ignore=shutil.ignore_patterns("qubesim")
    )
    return tmp_path / "inventory"


def write_vars(path: Path, values: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))


def preflight(inventory: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    # No qube is to be reached: the qubes connection's tools must not even be found.
    environment["PATH"] = os.pathsep.join([str(ANSIBLE_PLAYBOOK.parent), "/usr/bin", "/bin"])
    result = subprocess.run(
        [
            str(ANSIBLE_PLAYBOOK),
            "-i",
            str(inventory / "build_infra.yml"),
            str(ROOT / "playbooks/preflight.yml"),
            *arguments,
        ],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    return result


def test_the_example_inventory_passes(inventory: Path) -> None:
    write_vars(inventory / "group_vars/all/admin.yml", {"dom0_admin_qubes": ["mgmt"]})
    result = preflight(inventory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed=0" in result.stdout


@pytest.mark.parametrize(
    ("where", "qube"),
    [
        ("group_vars/all/builder.yml", "build-fedora"),
        ("host_vars/build-kernel/builder.yml", "build-kernel"),
    ],
)
def test_qubes_builderv2_is_refused_from_the_inventory(
    inventory: Path, where: str, qube: str
) -> None:
    write_vars(inventory / where, {"build_vm_builder_version": 2})
    result = preflight(inventory)
    assert result.returncode != 0
    assert V2_REFUSED.format(qube=qube) in result.stdout


def test_qubes_builderv2_is_refused_from_extra_vars_under_a_limit(inventory: Path) -> None:
    result = preflight(inventory, "--limit", "env_kernel", "-e", "build_vm_builder_version=2")
    assert result.returncode != 0
    assert V2_REFUSED.format(qube="build-kernel") in result.stdout
    # Only the hosts of the run: build-fedora is not among them.
    assert V2_REFUSED.format(qube="build-fedora") not in result.stdout


def test_builder_version_1_given_as_a_string_passes(inventory: Path) -> None:
    result = preflight(inventory, "-e", "build_vm_builder_version=1")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("admins", "message"),
    [
        (["@anyvm"], "dom0_admin_qubes: '@anyvm' is not a qube name"),
        (
            ["mgmt", "sys-net"],
            "dom0_admin_qubes: 'sys-net' is the net qube of the infrastructure;"
            " an admin qube must be a qube of its own",
        ),
        (["dom0"], "dom0_admin_qubes: 'dom0' is not a qube to name here"),
    ],
)
def test_admin_qubes_the_dom0_role_refuses_are_refused(
    inventory: Path, admins: list[str], message: str
) -> None:
    write_vars(inventory / "group_vars/all/admin.yml", {"dom0_admin_qubes": admins})
    result = preflight(inventory)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
