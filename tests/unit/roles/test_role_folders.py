"""The folders the roles install into in a qube: public defaults, checked against what persists
in an AppVM (/usr/local, /home, /rw), and never repeated as literal paths by the roles."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ansible_collections.qubes_infra.build.plugins.test.persistent_folder import persistent_folder

from tests.unit.roles.rendering import ROLES, role_file

# Each role's folders in the qube, by the public variable that names them.
FOLDERS = {
    "build_logs": ["build_logs_directory", "build_logs_lib_dir", "build_logs_etc_dir"],
    "build_vm": ["build_vm_lib_dir", "build_vm_etc_dir"],
    "ssh_proxy": ["ssh_proxy_etc_dir"],
    "webhooks": ["webhooks_lib_dir", "webhooks_etc_dir", "webhooks_home_dir"],
}


def specs(role: str) -> dict[str, dict[str, object]]:
    text = (ROLES / role / "meta/argument_specs.yml").read_text()
    return yaml.safe_load(text)["argument_specs"]["main"]["options"]


@pytest.mark.parametrize("role", sorted(FOLDERS))
def test_the_role_checks_its_folders_with_the_collections_one_rule(role: str) -> None:
    tasks = yaml.safe_load((ROLES / role / "tasks/main.yml").read_text())
    loop = f"{{{{ _{role}_folders | dict2items }}}}"
    checks = [task for task in tasks if task.get("loop") == loop]
    assert [task["ansible.builtin.assert"]["that"] for task in checks] == [
        "item.value is qubes_infra.build.persistent_folder"
    ]


@pytest.mark.parametrize("role", sorted(FOLDERS))
def test_the_role_checks_each_of_its_folders(role: str) -> None:
    checked = role_file(role, "vars/main.yml")[f"_{role}_folders"]
    assert checked == {name: f"{{{{ {name} }}}}" for name in FOLDERS[role]}


@pytest.mark.parametrize("role", sorted(FOLDERS))
def test_each_folder_is_a_documented_default_the_rule_accepts(role: str) -> None:
    defaults = role_file(role, "defaults/main.yml")
    options = specs(role)
    for name in FOLDERS[role]:
        assert options[name]["default"] == defaults[name], name
        assert persistent_folder(defaults[name]), name


def role_files(role: str) -> list[Path]:
    """What a role installs with: its tasks, handlers, templates and vars."""
    folders = ["tasks", "handlers", "templates", "vars"]
    return sorted(p for f in folders for p in (ROLES / role / f).glob("**/*") if p.is_file())


@pytest.mark.parametrize("role", sorted(FOLDERS))
def test_no_file_of_the_role_repeats_a_folder_its_defaults_hold(role: str) -> None:
    defaults = role_file(role, "defaults/main.yml")
    for name in FOLDERS[role]:
        for path in role_files(role):
            assert defaults[name] not in path.read_text(), (name, path)
