"""The collection's entry point runs from the repository root inside dom0."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(
    shutil.which("ansible-playbook") is None, reason="ansible-playbook not installed"
)
def test_site_playbook_runs_in_dom0() -> None:
    result = subprocess.run(
        ["ansible-playbook", "site.yml"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed=0" in result.stdout
