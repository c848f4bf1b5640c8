"""The definitions every service shares (qube names, component names, printable text, settings
files) and the package itself: its version and that every service checks names through them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

import qubes_infra_services
from qubes_infra_services import definitions
from tests.unit.services import SERVICES

PACKAGE = SERVICES / "qubes_infra_services"


def test_the_package_has_the_collections_version() -> None:
    galaxy = yaml.safe_load((SERVICES.parent / "galaxy.yml").read_text())
    assert qubes_infra_services.__version__ == galaxy["version"]


@pytest.mark.parametrize(
    "name",
    ["sys-net", "build-fedora", "a", "keys.fedora", "A_b-c", "x" * 31, "default-mgmt-dvm", "dm"],
)
def test_qube_names_qubes_accepts(name: str) -> None:
    assert definitions.is_qube_name(name)
    assert definitions.qube_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("x" * 32, "has 32 characters (1 to 31)"),
        ("", "has 0 characters"),
        ("1build", "breaks the rule"),
        ("-build", "breaks the rule"),
        ("_build", "breaks the rule"),
        (".build", "breaks the rule"),
        ("build fedora", "breaks the rule"),
        ("build/fedora", "breaks the rule"),
        ("lost+found", "breaks the rule"),
        ("build-fedora\n", "breaks the rule"),
        ("b\u00fcild", "breaks the rule"),
        ("none", "a name Qubes keeps for itself"),
        ("default", "a name Qubes keeps for itself"),
        ("Domain-0", "a name Qubes keeps for itself"),
        ("build-fedora-dm", "a name Qubes keeps for itself"),
        (None, "text, not NoneType"),
    ],
)
def test_qube_names_qubes_refuses(name: object, problem: str) -> None:
    assert not definitions.is_qube_name(name)
    assert problem in (definitions.qube_name_problem(name) or "")


def test_a_refused_qube_name_is_shown_printable_and_bounded() -> None:
    problem = definitions.qube_name_problem("\x1b[2J" + "x" * 100)
    assert problem is not None and "\x1b" not in problem and "x" * 41 not in problem


@pytest.mark.parametrize("name", ["core-admin", "a", "_underscore", "9lives", "c" * 64])
def test_component_names(name: str) -> None:
    assert definitions.is_component(name)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("-x", "starts with '-'"),
        ("--help", "starts with '-'"),
        ("-", "starts with '-'"),
        ("c" * 65, "of 65 characters (1 to 64)"),
        ("", "of 0 characters"),
        ("core.admin", "outside [A-Za-z0-9_-]"),
        ("core/admin", "outside [A-Za-z0-9_-]"),
        ("core admin", "outside [A-Za-z0-9_-]"),
        ("core-admin\n", "outside [A-Za-z0-9_-]"),
        (7, "text, not int"),
    ],
)
def test_component_names_refused(name: object, problem: str) -> None:
    assert not definitions.is_component(name)
    assert problem in (definitions.component_problem(name) or "")


def test_printable_text_is_one_bounded_line_or_the_end_of_an_error() -> None:
    assert definitions.printable("a\x00b\nc\u00e9d") == "a?b?c?d"
    assert definitions.printable("x" * 500) == "x" * definitions.PRINTABLE_LIMIT
    assert definitions.printable("abcdef", 3) == "abc"
    error = "\n".join(f"line {n}" for n in range(1000)) + "\nfatal: refused\n"
    shown = definitions.printable(error, 30, newlines=True, last=True)
    assert shown.endswith("line 999\nfatal: refused") and len(shown) <= 30
    assert "\x1b" not in definitions.printable("\x1b[31m", newlines=True, last=True)


def test_settings_come_from_the_file_the_environment_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QUBES_INFRA_TEST_SETTINGS", raising=False)
    assert definitions.settings_path("QUBES_INFRA_TEST_SETTINGS", "/etc/x.json") == "/etc/x.json"
    monkeypatch.setenv("QUBES_INFRA_TEST_SETTINGS", str(tmp_path / "y.json"))
    path = definitions.settings_path("QUBES_INFRA_TEST_SETTINGS", "/etc/x.json")
    assert path == str(tmp_path / "y.json")


def test_settings_over_defaults_and_a_missing_file(tmp_path: Path) -> None:
    defaults = {"a": 1, "b": 2}
    missing = str(tmp_path / "missing.json")
    assert definitions.load_settings(missing, defaults) == defaults
    with pytest.raises(FileNotFoundError):
        definitions.load_settings(missing)
    stored = tmp_path / "settings.json"
    stored.write_text(json.dumps({"b": 3, "c": 4}))
    assert definitions.load_settings(str(stored), defaults) == {"a": 1, "b": 3, "c": 4}
    assert defaults == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[1, 2]", "the settings are a JSON object, not list"),
        ("{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_settings_that_are_not_a_json_object_are_refused_naming_the_file(
    tmp_path: Path, content: str | bytes, problem: str
) -> None:
    stored = tmp_path / "settings.json"
    if isinstance(content, bytes):
        stored.write_bytes(content)
    else:
        stored.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{stored}: {problem}")):
        definitions.load_settings(str(stored), {"a": 1})


def test_no_service_keeps_a_name_pattern_of_its_own() -> None:
    """Qube and component names are checked through definitions only: no module but it compiles
    a pattern for them (the drift this package ended: a leading '-' let through by some)."""
    for module in sorted(PACKAGE.glob("*.py")):
        if module.name == "definitions.py":
            continue
        tree = ast.parse(module.read_text())
        names = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        assert not names & {"QUBE_NAME", "COMPONENT"}, module.name
        functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert "printable" not in functions and "_printable" not in functions, module.name


def test_every_entry_point_calls_one_main_of_the_package() -> None:
    """The programs the qrexec services and units run (with python3, which they name)."""
    programs = sorted(SERVICES.glob("*.py"))
    assert [program.name for program in programs] == [
        "build_log_receiver.py",
        "github_command.py",
        "trigger_build.py",
        "webhook_worker.py",
    ]
    for program in programs:
        text = program.read_text()
        assert f"from qubes_infra_services.{program.stem} import main\n" in text
        assert (PACKAGE / program.name).is_file()
