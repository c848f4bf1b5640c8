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
