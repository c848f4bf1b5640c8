"""`ansible-doc` renders every plugin, module, filter, test and role of the collection, as users
read it.

What to check is taken from the tree (the plugin files, the filters and tests each Jinja plugin file
provides, the roles' argument specs), so a new plugin or role is checked without touching this file.
Each one is rendered by the real ansible-doc against the `.collections` link tree, the way an
installed collection is found: it must exit 0, print nothing on stderr (Ansible's warnings and
errors go there) and name the plugin and every option its documentation declares.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
COLLECTIONS = REPOSITORY / ".collections"
COLLECTION = "qubes_infra.build"
PACKAGE = f"ansible_collections.{COLLECTION}"
ANSIBLE_DOC = Path(sys.executable).with_name("ansible-doc")
# Plugin types documented by a DOCUMENTATION string in plugins/TYPE_DIR/NAME.py.
PYTHON_DOCUMENTED = {
    "module": "modules",
    "connection": "connection",
    "inventory": "inventory",
    "become": "become",
}


def python_plugins() -> list[tuple[str, str]]:
    return [
        (plugin_type, path.stem)
        for plugin_type, directory in PYTHON_DOCUMENTED.items()
        for path in sorted((REPOSITORY / "plugins" / directory).glob("*.py"))
        if path.stem != "__init__"
    ]


# Jinja plugin types: the class each plugin file defines and the method listing what it provides.
JINJA_PLUGINS = {"filter": ("FilterModule", "filters"), "test": ("TestModule", "tests")}


def jinja_plugins(plugin_type: str) -> list[str]:
    """The filters or tests the collection's plugin files really provide (not the documented
    ones)."""
    class_name, method = JINJA_PLUGINS[plugin_type]
    names: list[str] = []
    for path in sorted((REPOSITORY / "plugins" / plugin_type).glob("*.py")):
        module = importlib.import_module(f"{PACKAGE}.plugins.{plugin_type}.{path.stem}")
        names += sorted(getattr(getattr(module, class_name)(), method)())
    return names


def roles() -> list[str]:
    return sorted(path.name for path in (REPOSITORY / "roles").iterdir() if path.is_dir())


def documentation_of_python_plugin(path: Path) -> dict[str, Any]:
    """The DOCUMENTATION string of a plugin file, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "DOCUMENTATION" for target in node.targets
        ):
            return yaml.safe_load(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no DOCUMENTATION")


def ansible_doc(plugin_type: str, name: str, workdir: Path) -> str:
    """What `ansible-doc -t TYPE qubes_infra.build.NAME` shows, once it rendered cleanly."""
    # Only the link tree decides what is found: not the checkout's ansible.cfg, not a user's.
    config = workdir / "ansible.cfg"
    config.write_text("[defaults]\n")
    environment = {
        **os.environ,
        "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_CONFIG": str(config),
    }
    result = subprocess.run(
        [str(ANSIBLE_DOC), "-t", plugin_type, f"{COLLECTION}.{name}"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"ansible-doc warned:\n{result.stderr}"
    # Without colours ansible-doc marks names *like this*.
    return result.stdout.replace("*", "")


def assert_names(text: str, plugin_type: str, name: str, options: list[str] | None) -> None:
    """options None: the plugin declares that it takes none (`options: {}`)."""
    # The heading names the plugin (`> ROLE: NAME (PATH)` from ansible-core 2.17 on,
    # `> NAME    (PATH)` in capitals before).
    heading = text.splitlines()[0] if text else ""
    assert heading.startswith("> ") and f"{COLLECTION}.{name} ".lower() in heading.lower(), text[
        :200
    ]
    if options is None:
        return
    assert options, f"{plugin_type} {name} documents no option"
    # Each option is listed as `- NAME  description` (`= NAME` when required).
    missing = [
        option
        for option in options
        if not re.search(rf"^[-=] {re.escape(option)}(\s|$)", text, re.MULTILINE)
    ]
    assert not missing, f"ansible-doc does not show the options {missing}"


@pytest.mark.parametrize(("plugin_type", "name"), python_plugins())
def test_python_plugin_renders(plugin_type: str, name: str, tmp_path: Path) -> None:
    path = REPOSITORY / "plugins" / PYTHON_DOCUMENTED[plugin_type] / f"{name}.py"
    text = ansible_doc(plugin_type, name, tmp_path)
    documentation = documentation_of_python_plugin(path)
    assert documentation.get("short_description"), f"{path}: no short_description"
    options = documentation.get("options")
    assert_names(text, plugin_type, name, None if options == {} else list(options or {}))


@pytest.mark.parametrize(
    ("plugin_type", "name"),
    [(plugin_type, name) for plugin_type in JINJA_PLUGINS for name in jinja_plugins(plugin_type)],
)
def test_filter_and_test_renders(plugin_type: str, name: str, tmp_path: Path) -> None:
    path = REPOSITORY / "plugins" / plugin_type / f"{name}.yml"
    assert path.is_file(), f"{plugin_type} {name} has no documentation file {path.name}"
    text = ansible_doc(plugin_type, name, tmp_path)
    documentation = yaml.safe_load(path.read_text())["DOCUMENTATION"]
    assert documentation["name"] == name
    assert_names(text, plugin_type, name, list(documentation.get("options") or {}))


@pytest.mark.parametrize("name", roles())
def test_role_renders(name: str, tmp_path: Path) -> None:
    specs_file = REPOSITORY / "roles" / name / "meta" / "argument_specs.yml"
    assert specs_file.is_file(), f"role {name} has no meta/argument_specs.yml"
    text = ansible_doc("role", name, tmp_path)
    entry_points = yaml.safe_load(specs_file.read_text())["argument_specs"]
    options = [option for spec in entry_points.values() for option in spec.get("options") or {}]
    assert_names(text, "role", name, options)
    for entry_point, spec in entry_points.items():
        assert spec.get("short_description"), f"role {name}, {entry_point}: no short_description"
        heading = f"ENTRY POINT: {entry_point} - {spec['short_description']}"
        assert heading in text, f"role {name}: no entry point {entry_point}"


def test_every_role_has_a_readme_for_release_engineers() -> None:
    """Each role's README says where it runs, its variables, its tag, and shows an example."""
    for name in roles():
        readme = (REPOSITORY / "roles" / name / "README.md").read_text()
        assert readme.startswith(f"# {COLLECTION}.{name}\n"), name
        for needed in (
            "Runs ",
            f"ansible-doc -t role {COLLECTION}.{name}",
            "meta/argument_specs.yml",
            f"--tags {name}",
            f"- {COLLECTION}.{name}",
        ):
            assert needed in readme, f"roles/{name}/README.md lacks {needed!r}"


def test_the_readme_lists_all_included_content() -> None:
    """The README's "Included content" names every role, playbook, module and plugin of the tree."""
    readme = (REPOSITORY / "README.md").read_text()
    section = readme.split("\n## Included content\n", 1)[1].split("\n## ", 1)[0]
    needed = [f"| `{name}` |" for name in roles()]
    needed += [f"(roles/{name}/README.md)" for name in roles()]
    playbooks = sorted((REPOSITORY / "playbooks").glob("*.yml"))
    needed += [f"| `{COLLECTION}.{path.stem}` |" for path in playbooks]
    for plugin_type, name in python_plugins():
        kind = "" if plugin_type == "module" else f" {plugin_type} |"
        needed.append(f"| `{COLLECTION}.{name}` |{kind}")
    needed += [
        f"| `{COLLECTION}.{name}` | {plugin_type} |"
        for plugin_type in JINJA_PLUGINS
        for name in jinja_plugins(plugin_type)
    ]
    missing = [entry for entry in needed if entry not in section]
    assert not missing, f"README.md's Included content lacks {missing}"
