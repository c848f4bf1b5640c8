"""Each role names its variables by their kind (docs/development.md, "Variables in roles"):
ROLE_* public (defaults), _ROLE_* its vars/ values, __ROLE_* what its tasks find at run time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.roles.rendering import ROLES

ROLE_NAMES = sorted(p.name for p in ROLES.iterdir() if (p / "tasks/main.yml").is_file())
BLOCK_KEYS = ("block", "rescue", "always")


def yaml_keys(path: Path) -> list[str]:
    return list(yaml.safe_load(path.read_text()) or {}) if path.is_file() else []


def tasks(items: list[dict[str, Any]] | None) -> Iterator[dict[str, Any]]:
    """Every task and block of a task list, blocks' own tasks included."""
    for item in items or []:
        yield item
        for key in BLOCK_KEYS:
            yield from tasks(item.get(key))


def runtime_names(task: dict[str, Any]) -> Iterator[str]:
    """The names a task gives values found at run time."""
    if "register" in task:
        yield task["register"]
    for module in ("set_fact", "ansible.builtin.set_fact"):
        yield from (name for name in task.get(module) or {} if name != "cacheable")
    yield from task.get("vars") or {}
    if "loop_var" in (task.get("loop_control") or {}):
        yield task["loop_control"]["loop_var"]


def task_files(role: str) -> list[Path]:
    folders = ("tasks", "handlers")
    return sorted(path for folder in folders for path in (ROLES / role / folder).glob("*.yml"))


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_public_variables_carry_the_role_name(role: str) -> None:
    for name in yaml_keys(ROLES / role / "defaults/main.yml"):
        assert name.startswith(f"{role}_"), name


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_vars_values_carry_one_underscore_and_the_role_name(role: str) -> None:
    for name in yaml_keys(ROLES / role / "vars/main.yml"):
        assert name.startswith(f"_{role}_"), name


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_runtime_values_carry_two_underscores_and_the_role_name(role: str) -> None:
    for path in task_files(role):
        for task in tasks(yaml.safe_load(path.read_text())):
            for name in runtime_names(task):
                assert name.startswith(f"__{role}_"), (path.name, task.get("name"), name)
