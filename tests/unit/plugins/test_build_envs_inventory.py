"""The build_envs inventory plugin through ansible-inventory, on the example inventories and on
bad group_vars."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
ANSIBLE_INVENTORY = shutil.which("ansible-inventory") or str(ROOT / ".venv/bin/ansible-inventory")


def inventory(source: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")}
    return subprocess.run(
        [ANSIBLE_INVENTORY, "-i", str(source), *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
    )


def unwrap(value: Any) -> Any:
    """ansible-inventory marks plugin-provided values as unsafe: {"__ansible_unsafe": ...}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: unwrap(item) for key, item in value.items()}
    if isinstance(value, list):
        return [unwrap(item) for item in value]
    return value


def listing(source: Path) -> dict[str, Any]:
    result = inventory(source, "--list")
    assert result.returncode == 0, result.stderr
    return unwrap(json.loads(result.stdout))


def test_example_inventory_hosts_groups_and_vars() -> None:
    data = listing(ROOT / "inventory/build_infra.yml")
    groups = {
        name: sorted(value.get("hosts", [])) for name, value in data.items() if name != "_meta"
    }
    assert groups["build_vms"] == ["build-fedora", "build-kernel"]
    assert groups["keys_vms"] == ["keys-fedora", "keys-kernel"]
    assert groups["logs_vms"] == ["build-logs"]
    assert groups["net_vms"] == ["sys-net"]
    assert groups["templates"] == ["fedora-43-minimal", "fedora-43-xfce"]
    assert groups["env_fedora"] == ["build-fedora", "build-logs", "dom0", "keys-fedora"]
    hostvars = data["_meta"]["hostvars"]
    assert hostvars["dom0"]["ansible_connection"] == "local"
    for qube in ("keys-kernel", "build-logs", "sys-net", "fedora-43-minimal"):
        assert hostvars[qube]["ansible_connection"] == "qubes_infra.build.qubes"
        assert hostvars[qube]["ansible_become_method"] == "qubes_infra.build.qubes"
    assert "ansible_become_method" not in hostvars["dom0"]
    assert hostvars["keys-kernel"]["build_infra_env"] == "kernel"
    assert hostvars["keys-kernel"]["build_infra_qube"] == {
        "kind": "keys",
        "env": "kernel",
        "class": "AppVM",
        "label": "black",
        "template": "fedora-43-minimal",
        "netvm": None,
        "volume_size": None,
    }
    assert hostvars["build-fedora"]["build_infra_qube"]["volume_size"] == 60 * 1024**3
    assert hostvars["fedora-43-xfce"]["build_infra_template_kinds"] == ["build", "logs"]


def test_qubesim_variant_uses_the_simulator_template() -> None:
    data = listing(ROOT / "inventory/qubesim/build_infra.yml")
    assert sorted(data["templates"]["hosts"]) == ["debian-12"]
    kinds = data["_meta"]["hostvars"]["debian-12"]["build_infra_template_kinds"]
    assert kinds == ["build", "keys", "logs", "net"]


def test_graph_shows_the_environments() -> None:
    result = inventory(ROOT / "inventory/build_infra.yml", "--graph")
    assert result.returncode == 0
    assert "@env_kernel:" in result.stdout and "|--keys-kernel" in result.stdout


def test_an_environment_group_selects_dom0_and_its_own_qubes_only() -> None:
    """`--limit env_kernel` must run dom0's play (it makes the qubes and their policy) and
    none of another environment's qubes; the shared logs qube belongs to both."""
    result = inventory(ROOT / "inventory/build_infra.yml", "--limit", "env_kernel", "--list")
    assert result.returncode == 0, result.stderr
    data = unwrap(json.loads(result.stdout))
    assert sorted(data["_meta"]["hostvars"]) == [
        "build-kernel",
        "build-logs",
        "dom0",
        "keys-kernel",
    ]


def test_constructed_options(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "inventory/group_vars", tmp_path / "group_vars")
    (tmp_path / "build_infra.yml").write_text(
        "plugin: qubes_infra.build.build_envs\n"
        "compose:\n  qube_label: build_infra_qube.label | default('none')\n"
        "groups:\n  black_qubes: (build_infra_qube | default({})).label | default('') == 'black'\n"
        "keyed_groups:\n  - key: build_infra_qube.template | default('none')\n    prefix: tmpl\n"
    )
    data = listing(tmp_path / "build_infra.yml")
    assert sorted(data["black_qubes"]["hosts"]) == ["keys-fedora", "keys-kernel"]
    assert sorted(data["tmpl_fedora_43_minimal"]["hosts"]) == ["keys-fedora", "keys-kernel"]
    assert data["_meta"]["hostvars"]["build-logs"]["qube_label"] == "green"


@pytest.mark.parametrize(
    ("group_vars", "message"),
    [
        (
            "build_infra_envs:\n  logs: {}\n",
            "build_infra_envs.logs.logs: 'build-logs' is also the build qube of env 'logs'",
        ),
        (
            "build_infra_envs:\n  fedora:\n    volume_size: lots\n",
            "build_infra_envs.fedora.volume_size: size 'lots' must be a positive number",
        ),
        (
            "build_infra_envs:\n  fedora:\n    builders:\n"
            "      - {dir: /b, release: R4, config_file: c}\n",
            "build_infra_envs.fedora.builders[0].release: 'R4' must look like 4.2",
        ),
        (
            "build_infra_envs:\n  a_very_long_environment_name:\n    logs: build-logs\n",
            "is longer than 31 characters",
        ),
    ],
)
def test_bad_group_vars_fail_with_a_clear_error(
    tmp_path: Path, group_vars: str, message: str
) -> None:
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text(group_vars)
    (tmp_path / "build_infra.yml").write_text("plugin: qubes_infra.build.build_envs\n")
    result = inventory(tmp_path / "build_infra.yml", "--list")
    assert message in result.stderr


ANSIBLE_VAULT = Path(ANSIBLE_INVENTORY).with_name("ansible-vault")


def vault_inventory(tmp_path: Path) -> tuple[Path, Path]:
    """An inventory whose environments are in a Vault-encrypted group_vars file, with an inline
    !vault value and templates in another; returns the inventory file and the password file."""
    password = tmp_path / "vault-password"
    password.write_text("correct horse\n")
    folder = tmp_path / "group_vars" / "all"
    folder.mkdir(parents=True)
    secret = folder / "envs.yml"
    secret.write_text("build_infra_envs:\n  vaulted:\n    volume_size: 30GiB\n")
    password_option = ("--vault-password-file", str(password))
    vault = [str(ANSIBLE_VAULT), "encrypt", *password_option, str(secret)]
    subprocess.run(vault, check=True, capture_output=True)
    assert secret.read_text().startswith("$ANSIBLE_VAULT")
    inline = subprocess.run(
        [
            str(ANSIBLE_VAULT),
            "encrypt_string",
            *password_option,
            "fedora-43-custom",
            "--name",
            "build_infra_build_template",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (folder / "layout.yml").write_text(
        "site_net: sys-office-net\n"
        'build_infra_netvm: "{{ site_net }}"\n'
        "build_infra_logs_template: \"{{ lookup('ansible.builtin.env', 'TEMPLATE_OF_LOGS') }}\"\n"
        + inline
    )
    (tmp_path / "build_infra.yml").write_text("plugin: qubes_infra.build.build_envs\n")
    return tmp_path / "build_infra.yml", password


def test_vault_files_and_values_and_templates_are_read_through_ansible_loaders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEMPLATE_OF_LOGS", "fedora-43-logs")
    source, password = vault_inventory(tmp_path)
    result = inventory(source, "--vault-password-file", str(password), "--list")
    assert result.returncode == 0, result.stderr
    data = unwrap(json.loads(result.stdout))
    hostvars = data["_meta"]["hostvars"]
    assert hostvars["build-vaulted"]["build_infra_qube"] == {
        "kind": "build",
        "env": "vaulted",
        "class": "AppVM",
        "label": "green",
        "template": "fedora-43-custom",
        "netvm": "sys-whonix",
        "volume_size": 30 * 1024**3,
    }
    assert sorted(data["net_vms"]["hosts"]) == ["sys-office-net"]
    assert sorted(data["templates"]["hosts"]) == [
        "fedora-43-custom",
        "fedora-43-logs",
        "fedora-43-minimal",
    ]
    model = hostvars["dom0"]["build_infra"]
    assert model["netvm"] == "sys-office-net"
    assert model["settings"]["build_infra_build_template"] == "fedora-43-custom"
    assert model["settings"]["build_infra_envs"] == {"vaulted": {"volume_size": "30GiB"}}
    assert model["envs"]["vaulted"]["volume_size"] == 30 * 1024**3
    # One model, published on every host the plugin makes.
    assert all(variables["build_infra"] == model for variables in hostvars.values())


def test_vault_files_need_the_vault_password(tmp_path: Path) -> None:
    """As for any group_vars file Ansible reads: without the password, no inventory."""
    source, _password = vault_inventory(tmp_path)
    result = inventory(source, "--graph")
    assert result.returncode != 0
    assert "build-vaulted" not in result.stdout
    assert "vault" in result.stderr.lower()


def test_a_template_naming_no_variable_of_group_vars_all_is_refused(tmp_path: Path) -> None:
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text(
        'build_infra_envs: {fedora: {}}\nbuild_infra_netvm: "{{ inventory_hostname }}"\n'
    )
    (tmp_path / "build_infra.yml").write_text("plugin: qubes_infra.build.build_envs\n")
    result = inventory(tmp_path / "build_infra.yml", "--graph")
    assert result.returncode != 0
    message = " ".join(result.stderr.split())  # ansible-core 2.16 wraps warnings, paths too
    assert "build_infra_netvm (in " in message
    assert "/group_vars/all): cannot be rendered" in message
    assert "'inventory_hostname' is undefined" in message
