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


PREFLIGHT = ROOT / "playbooks/preflight.yml"


def preflight(
    inventory: Path, *arguments: str, playbook: Path = PREFLIGHT
) -> subprocess.CompletedProcess[str]:
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
            str(playbook),
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


# -- one description per run ---------------------------------------------------------------------
OTHER_ENVS = {"build_infra_envs": {"fedora": {}, "debian": {}}}


def refusal(result: subprocess.CompletedProcess[str], variable: str, host: str, source: str) -> str:
    """The refusal of `variable` for `host` from `source`; the run stopped before the next play."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"Refused before anything changes: {variable} for {host} comes from {source}" in output
    # The settings play comes after this one: nothing ran past the refusal.
    assert "Preflight | Refuse admin qubes" not in output, output
    return output


def test_environments_given_as_extra_vars_file_are_refused(inventory: Path, tmp_path: Path) -> None:
    """The defect: -e @envs.yml naming fedora and debian, while the inventory makes fedora's and
    kernel's hosts."""
    envs = tmp_path / "envs.yml"
    write_vars(envs, OTHER_ENVS)
    result = preflight(inventory, "-e", f"@{envs}")
    for host in ("dom0", "build-fedora", "keys-kernel", "sys-net", "fedora-43-xfce"):
        output = refusal(result, "build_infra_envs", host, f"extra vars (-e @{envs})")
    assert (
        f"Put the build_infra_* settings only in {inventory}/group_vars/all, the files the"
        " build_envs inventory plugin reads"
    ) in output


def test_a_setting_given_with_e_on_the_command_line_is_refused(inventory: Path) -> None:
    result = preflight(inventory, "-e", "build_infra_build_netvm=sys-firewall")
    refusal(result, "build_infra_build_netvm", "build-kernel", "extra vars (-e)")


def test_the_inventory_s_own_value_given_again_with_e_passes(inventory: Path) -> None:
    result = preflight(inventory, "-e", "build_infra_netvm=sys-net")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("where", "variable", "host"),
    [
        ("host_vars/build-kernel.yml", "build_infra_envs", "build-kernel"),
        ("host_vars/dom0/envs.yml", "build_infra_envs", "dom0"),
        ("group_vars/keys_vms.yml", "build_infra_keys_template", "keys-fedora"),
    ],
)
def test_a_setting_from_another_vars_file_of_the_inventory_is_refused(
    inventory: Path, where: str, variable: str, host: str
) -> None:
    write_vars(inventory / where, {variable: OTHER_ENVS["build_infra_envs"]})
    kind = where.split("/")[0]
    found = inventory / where
    result = preflight(inventory)
    refusal(result, variable, host, f"the {kind} file {found}")


def test_the_plugin_s_host_variables_are_set_by_no_one_else(inventory: Path) -> None:
    write_vars(inventory / "host_vars/dom0.yml", {"build_infra_qube": {"kind": "build"}})
    write_vars(inventory / "host_vars/build-fedora.yml", {"build_infra": {}})
    result = preflight(inventory)
    output = refusal(
        result, "build_infra_qube", "dom0", f"the host_vars file {inventory}/host_vars/dom0.yml"
    )
    assert ", and the inventory gives dom0 no build_infra_qube" in output
    refusal(
        result,
        "build_infra",
        "build-fedora",
        f"the host_vars file {inventory}/host_vars/build-fedora.yml",
    )


def test_a_setting_from_the_vars_of_an_import_playbook_is_refused(
    inventory: Path, tmp_path: Path
) -> None:
    """A wrapper playbook's `vars:` on import_playbook become the imported plays' vars."""
    wrapper = tmp_path / "wrapper.yml"
    wrapper.write_text(yaml.safe_dump([{"import_playbook": str(PREFLIGHT), "vars": OTHER_ENVS}]))
    result = preflight(inventory, playbook=wrapper)
    refusal(result, "build_infra_envs", "dom0", "play vars (vars: of the play")


def test_templated_and_vault_encrypted_settings_of_the_inventory_pass(
    inventory: Path, tmp_path: Path
) -> None:
    password = tmp_path / "vault-password"
    password.write_text("correct horse\n")
    vault = ANSIBLE_PLAYBOOK.with_name("ansible-vault")
    encrypted = subprocess.run(
        [str(vault), "encrypt_string", "--vault-password-file", str(password), "sys-whonix",
         "--name", "build_infra_build_netvm"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    text = (inventory / "group_vars/all/build_infra.yml").read_text()
    text = text.replace("build_infra_build_netvm: sys-whonix\n", encrypted)
    text = text.replace("build_infra_netvm: sys-net\n", 'build_infra_netvm: "{{ site_net }}"\n')
    (inventory / "group_vars/all/build_infra.yml").write_text(text + "site_net: sys-net\n")
    result = preflight(inventory, "--vault-password-file", str(password))
    assert result.returncode == 0, result.stdout + result.stderr
