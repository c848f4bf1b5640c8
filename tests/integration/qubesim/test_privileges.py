"""qubesim needs root, and says so to anyone else."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture(scope="module")
def as_nobody() -> list[str]:
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import qubesim"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this Python installation is not readable by an unprivileged user")
    return NOBODY


@pytest.mark.parametrize("command", [["qubesim", "init"], ["qubesim", "dom0", "--", "true"]])
def test_qubesim_refuses_non_root(as_nobody: list[str], command: list[str]) -> None:
    executable = shutil.which(command[0])
    assert executable is not None
    result = subprocess.run([*as_nobody, executable, *command[1:]], capture_output=True, text=True)
    assert result.returncode == 1
    assert "qubesim needs root" in result.stderr


def test_qvm_tools_refuse_non_root(as_nobody: list[str]) -> None:
    executable = shutil.which("qvm-ls")
    assert executable is not None
    result = subprocess.run([*as_nobody, executable], capture_output=True, text=True)
    assert result.returncode == 1
    assert "need root" in result.stderr
