"""The folders the roles install into in a qube: public defaults, checked against what persists
in an AppVM (/usr/local, /home, /rw), and never repeated as literal paths by the roles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.unit.roles.rendering import ROLES, role_file

# Each role's folders in the qube, by the public variable that names them.
FOLDERS = {
    "build_logs": ["build_logs_directory", "build_logs_lib_dir", "build_logs_etc_dir"],
    "build_vm": ["build_vm_lib_dir", "build_vm_etc_dir"],
    "ssh_proxy": ["ssh_proxy_etc_dir"],
    "webhooks": ["webhooks_lib_dir", "webhooks_etc_dir", "webhooks_home_dir"],
}


def persistent_folder(role: str) -> re.Pattern[str]:
    return re.compile(role_file(role, "vars/main.yml")[f"_{role}_persistent_folder"])


def specs(role: str) -> dict[str, dict[str, object]]:
    text = (ROLES / role / "meta/argument_specs.yml").read_text()
    return yaml.safe_load(text)["argument_specs"]["main"]["options"]


def test_every_role_applies_the_same_rule() -> None:
    rules = {persistent_folder(role).pattern for role in FOLDERS}
    assert len(rules) == 1, rules


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
        assert persistent_folder(role).match(defaults[name]), name


@pytest.mark.parametrize(
    "folder",
    [
        "/usr/local/lib/qubes-infra-build",
        "/home/user",
        "/home/user/.local/state/x_y-1.2",
        "/rw/qubes-infra-build/etc",
    ],
)
def test_the_rule_accepts_what_persists(folder: str) -> None:
    assert persistent_folder("webhooks").match(folder)


@pytest.mark.parametrize(
    "folder",
    [
        "/etc/qubes-infra-build",  # the root volume of an AppVM: gone at shutdown
        "/var/lib/qubes-infra-build",
        "/usr/lib/qubes-infra-build",
        "/usr/local",  # the persistent folders themselves, not a folder of the role
        "/home",
        "/usr/localx/lib",
        "/rwx/lib",
        "/home/user/../../etc",
        "/home/./user",
        "/home/user/",
        "/home//user",
        "home/user",
        "~/lib",
        "/home/user dir",
        "/home/user\n",
        "/home/user;rm",
        "/home/$USER",
    ],
)
def test_the_rule_refuses_anything_else(folder: str) -> None:
    assert not persistent_folder("webhooks").match(folder)


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
