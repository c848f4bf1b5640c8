"""The collection as users get it: the artifact that `ansible-galaxy collection build` makes,
installed into an empty collections path of a fresh virtual environment that has nothing but
ansible-core, runs `ansible-playbook qubes_infra.build.site` on qubesim, with a user's own
ansible.cfg and inventory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qubesim import world
from qubesim.layout import current
from tests.integration.conftest import (
    ROOT,
    copy_inventory,
    install_artifact,
    run_tool,
)


def ansible_core_requirement() -> str:
    """The ansible-core the project is developed with (pyproject.toml's dev extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (requirement,) = (
        r for r in project["project"]["optional-dependencies"]["dev"]
        if re.match(r"ansible-core\b", r)
    )  # fmt: skip
    return requirement


@pytest.fixture(scope="module")
def fresh_environment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with ansible-core only; returns its bin directory."""
    place = tmp_path_factory.mktemp("venv")
    run_tool(sys.executable, "-m", "venv", str(place))
    pip = [str(place / "bin/pip"), "install", "--quiet", "--disable-pip-version-check"]
    run_tool(*pip, ansible_core_requirement())
    return place / "bin"


def test_the_installed_artifact_runs_the_site_on_qubesim(
    tmp_path: Path, fresh_environment: Path
) -> None:
    collections = install_artifact(tmp_path / "artifact", fresh_environment)
    config = tmp_path / "ansible.cfg"
    config.write_text(f"[defaults]\ncollections_path = {collections}\n")
    inventory = tmp_path / "inventory"
    copy_inventory(inventory)
    outside = world.World(current())
    world.up(outside)

    # The user's shell: the fresh environment first, no setting of this checkout.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    environment["ANSIBLE_CONFIG"] = str(config)
    environment["PATH"] = f"{fresh_environment}:{environment['PATH']}"
    playbook = ["ansible-playbook", "-i", str(inventory / "build_infra.yml")]
    result = subprocess.run(
        [*playbook, "-e", f"@{outside.variables_file}", "qubes_infra.build.site"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "failed=0" in result.stdout and "failed=1" not in result.stdout
    assert (collections / "ansible_collections/qubes_infra/build/roles/build_vm").is_dir()
    assert not (collections / "ansible_collections/qubes_infra/build/qubesim").exists()
