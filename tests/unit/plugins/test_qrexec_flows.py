"""The qrexec_flows module's refusals, as `ansible` shows them to a user: bad arguments and a
machine that is no dom0 end the task with a message naming what is wrong. (Its verdicts on flows
are tested against qubesim's dom0 in tests/integration/roles/test_dom0_flows.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
ANSIBLE = Path(sys.executable).with_name("ansible")
FLOW = {"source": "build-fedora", "target": "dom0", "service": "qubesbuilder.BuildLog"}


def qrexec_flows(arguments: dict[str, object], path: str) -> tuple[int, dict[str, object]]:
    """The module run by `ansible` on localhost with PATH as given: its exit code and result."""
    run = subprocess.run(
        [
            str(ANSIBLE),
            "localhost",
            "-i",
            "localhost,",
            "-c",
            "local",
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-m",
            "qubes_infra.build.qrexec_flows",
            "-a",
            json.dumps(arguments),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "PATH": path},
        cwd=ROOT,
        timeout=120,
    )
    _host, _state, result = run.stdout.partition(" => ")
    return run.returncode, json.loads(result)


def test_jobs_below_one_are_refused_naming_the_option() -> None:
    rc, result = qrexec_flows({"flows": [FLOW], "jobs": 0}, os.environ["PATH"])
    assert rc != 0
    assert result["msg"] == "jobs: 0 is not a number of calls at once (at least 1)"


def test_a_flow_without_its_service_is_refused_by_the_argument_spec() -> None:
    rc, result = qrexec_flows({"flows": [{"source": "build-fedora"}]}, os.environ["PATH"])
    assert rc != 0
    assert "missing required arguments: service found in flows" in str(result["msg"])


def test_a_machine_without_the_dom0_tools_cannot_check_and_says_which_is_missing() -> None:
    # Only the directories of python and ansible: no qvm-ls, no qrexec-policy-exec.
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    if any(Path(directory, "qvm-ls").exists() for directory in path.split(":")):
        pytest.skip("a dom0: the tools are there")
    rc, result = qrexec_flows({"flows": [FLOW]}, path)
    assert rc != 0
    assert "qvm-ls" in str(result["msg"])
    assert "checked" not in result
