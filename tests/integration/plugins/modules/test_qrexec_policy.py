"""The qrexec_policy module in dom0 (qubesim): a validated policy file, written atomically."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import run_module

POLICY_DIR = Path("/etc/qubes/policy.d")
NAME = "25-qubesim-module-test.policy"


def policy_task(*options: str, **arguments: Any) -> subprocess.CompletedProcess[str]:
    return run_module("qubes_infra.build.qrexec_policy", {"name": NAME, **arguments}, *options)


def changed(result: subprocess.CompletedProcess[str]) -> bool:
    assert result.returncode == 0, result.stdout + result.stderr
    return '"changed": true' in result.stdout


@pytest.fixture(autouse=True)
def clean() -> Iterator[None]:
    yield
    for path in (POLICY_DIR / NAME, POLICY_DIR / "26-qubesim-broken.policy"):
        path.unlink(missing_ok=True)


RULES = [
    "qubesbuilder.BuildLog * build-fedora dom0 allow target=build-logs",
    {
        "service": "qubesbuilder.LogReceived",
        "argument": "+build-fedora",
        "source": "build-logs",
        "target": "dom0",
        "action": "allow",
        "params": {"target": "keys-fedora"},
    },
]


def test_writes_the_rules_then_changes_nothing() -> None:
    assert changed(policy_task(rules=RULES))
    lines = (POLICY_DIR / NAME).read_text().splitlines()
    assert lines[1:] == [
        "qubesbuilder.BuildLog * build-fedora dom0 allow target=build-logs",
        "qubesbuilder.LogReceived +build-fedora build-logs dom0 allow target=keys-fedora",
    ]
    assert lines[0].startswith("# Managed by Ansible")
    assert oct((POLICY_DIR / NAME).stat().st_mode & 0o777) == "0o644"
    assert not changed(policy_task(rules=RULES))
    assert [p.name for p in POLICY_DIR.iterdir() if p.name.startswith(".")] == []


def test_check_mode_and_diff() -> None:
    result = policy_task("--check", "--diff", rules=RULES)
    assert changed(result)
    assert "+qubesbuilder.BuildLog" in result.stdout
    assert not (POLICY_DIR / NAME).exists()


def test_a_syntax_error_is_never_installed() -> None:
    policy_task(rules=RULES)
    before = (POLICY_DIR / NAME).read_text()
    result = policy_task(rules=[*RULES, "qubes.Gpg * @anyvm @anyvm permit"])
    assert result.returncode != 0
    assert f"{POLICY_DIR / NAME}:4: invalid action 'permit'" in result.stdout
    assert (POLICY_DIR / NAME).read_text() == before


def test_refuses_when_another_file_breaks_the_policy() -> None:
    (POLICY_DIR / "26-qubesim-broken.policy").write_text("broken line\n")
    result = policy_task(rules=RULES)
    assert result.returncode != 0
    assert "26-qubesim-broken.policy:1: wrong number of fields" in result.stdout
    assert not (POLICY_DIR / NAME).exists()


def test_bad_rules_and_names_are_named() -> None:
    result = policy_task(rules=[{"service": "x", "source": "a", "target": "b"}])
    assert "rules[0]: 'action' is required" in result.stdout
    result = policy_task(name="Bad Name.policy", rules=RULES)
    assert "must match [0-9a-z_.-]+.policy" in result.stdout


def test_absent_removes_the_file() -> None:
    policy_task(rules=RULES)
    assert changed(policy_task(state="absent"))
    assert not (POLICY_DIR / NAME).exists()
    assert not changed(policy_task(state="absent"))
