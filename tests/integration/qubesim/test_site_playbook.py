"""The collection's entry point runs from the repository root inside dom0, on the example
inventory's qubesim variant: it creates the qubes and the policy, and converges."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.conftest import Qvm

ROOT = Path(__file__).resolve().parents[3]
QUBESIM_INVENTORY = "inventory/qubesim/build_infra.yml"


def site(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ansible-playbook", "-i", QUBESIM_INVENTORY, "site.yml", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_site_dom0_creates_the_example_qubes_and_converges(qvm: Qvm) -> None:
    first = site("--tags", "dom0")
    assert first.returncode == 0, first.stdout + first.stderr
    names = qvm("qvm-ls", "--raw-list").stdout.split()
    for qube in ("build-fedora", "keys-fedora", "build-kernel", "keys-kernel", "build-logs"):
        assert qube in names
    assert qvm("qvm-prefs", "keys-fedora", "netvm").stdout == "\n"
    assert qvm("qvm-prefs", "build-fedora", "label").stdout == "green\n"
    again = site("--tags", "dom0", "--diff")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed=0" in again.stdout


def test_site_check_mode_changes_nothing_on_a_converged_host() -> None:
    site("--tags", "dom0")
    checked = site("--tags", "dom0", "--check", "--diff")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "changed=0" in checked.stdout


def test_removing_an_environment(qvm: Qvm, tmp_path: Path) -> None:
    """Its policy lines go at once; its qubes stay unless dom0_prune is true."""
    import shutil

    import yaml

    inventory = tmp_path / "inventory"
    shutil.copytree(ROOT / "inventory/qubesim", inventory)
    variables_file = inventory / "group_vars/all/build_infra.yml"
    variables = yaml.safe_load(variables_file.read_text())
    del variables["build_infra_envs"]["kernel"]
    variables_file.write_text(yaml.safe_dump(variables))
    policy = Path("/etc/qubes/policy.d/20-qubes-infra-build.policy")
    try:
        site("--tags", "dom0")
        kept = subprocess.run(
            [
                "ansible-playbook",
                "-i",
                str(inventory / "build_infra.yml"),
                "site.yml",
                "--tags",
                "dom0",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert "build-kernel" not in policy.read_text()
        assert "build-kernel" in qvm("qvm-ls", "--raw-list").stdout.split()
        pruned = subprocess.run(
            [
                "ansible-playbook",
                "-i",
                str(inventory / "build_infra.yml"),
                "site.yml",
                "--tags",
                "dom0",
                "-e",
                "dom0_prune=true",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        names = qvm("qvm-ls", "--raw-list").stdout.split()
        assert "build-kernel" not in names and "keys-kernel" not in names
        assert "build-fedora" in names
    finally:
        site("--tags", "dom0")  # the example again, for the other tests
