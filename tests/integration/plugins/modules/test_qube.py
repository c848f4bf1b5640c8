"""The qube module in dom0 (qubesim), through ansible: idempotence, check mode, diff, errors."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

from tests.integration.conftest import Qvm, run_module


def qube_task(name: str, *options: str, **arguments: Any) -> subprocess.CompletedProcess[str]:
    return run_module("qubes_infra.build.qube", {"name": name, **arguments}, *options)


def changed(result: subprocess.CompletedProcess[str]) -> bool:
    assert result.returncode == 0, result.stdout + result.stderr
    return '"changed": true' in result.stdout


WANTED = {
    "label": "green",
    "netvm": "",
    "volume_size": "3GiB",
    "properties": {"memory": 800, "provides_network": True},
    "tags": ["created-by-ansible"],
    "features": {"os": "Linux"},
    "services": {"crond": True, "cups": False},
}


def test_creates_then_changes_nothing(qvm: Qvm, new_name: Callable[[], str]) -> None:
    name = new_name()
    assert changed(qube_task(name, **WANTED))
    prefs = qvm("qvm-prefs", name).stdout
    assert any(line.split()[:3] == ["memory", "-", "800"] for line in prefs.splitlines())
    assert qvm("qvm-prefs", name, "netvm").stdout == ""
    assert qvm("qvm-volume", "info", f"{name}:private", "size").stdout == f"{3 * 1024**3}\n"
    assert qvm("qvm-tags", name).stdout.split() == ["created-by-ansible", "created-by-dom0"]
    assert qvm("qvm-service", name).stdout.split() == ["crond", "on", "cups", "off"]
    assert not changed(qube_task(name, **WANTED))


def test_check_mode_changes_nothing_and_shows_the_diff(
    qvm: Qvm, new_name: Callable[[], str]
) -> None:
    name = new_name()
    result = qube_task(name, "--check", "--diff", **WANTED)
    assert changed(result)
    assert "present" in result.stdout and "absent" in result.stdout
    assert qvm("qvm-check", "--quiet", name, check=False).returncode == 1
    qube_task(name, **WANTED)
    altered = qube_task(name, "--check", "--diff", **{**WANTED, "label": "red"})
    assert changed(altered)
    assert qvm("qvm-prefs", name, "label").stdout == "green\n"


def test_refuses_to_shrink_the_private_volume(qvm: Qvm, new_name: Callable[[], str]) -> None:
    name = new_name()
    qube_task(name, label="red", volume_size="4GiB")
    result = qube_task(name, label="red", volume_size="2GiB")
    assert result.returncode != 0
    assert "can only grow" in result.stdout
    assert qvm("qvm-volume", "info", f"{name}:private", "size").stdout == f"{4 * 1024**3}\n"


def test_power_state_and_removal(qvm: Qvm, new_name: Callable[[], str]) -> None:
    name = new_name()
    assert changed(qube_task(name, label="blue", state="running"))
    assert qvm("qvm-check", "--running", "--quiet", name).returncode == 0
    assert not changed(qube_task(name, label="blue", state="running"))
    assert changed(qube_task(name, state="halted"))
    assert qvm("qvm-check", "--running", "--quiet", name, check=False).returncode == 1
    qube_task(name, state="running")
    assert changed(qube_task(name, state="absent"))
    assert qvm("qvm-check", "--quiet", name, check=False).returncode == 1
    assert not changed(qube_task(name, state="absent"))


def test_a_new_qube_needs_a_label(new_name: Callable[[], str]) -> None:
    result = qube_task(new_name())
    assert result.returncode != 0
    assert "needs a label" in result.stdout


def test_empty_references_as_upstream_prints_them(qvm: Qvm, new_name: Callable[[], str]) -> None:
    """qvm-prefs lists an empty netvm or default_dispvm as `None` (qubesadmin/tools/
    qvm_prefs.py): the module reads it as "", so a run after the first changes nothing."""
    name = new_name()
    wanted = {"label": "black", "netvm": "", "properties": {"default_dispvm": ""}}
    assert changed(qube_task(name, **wanted))
    assert any(
        line.split()[:3] == ["netvm", "-", "None"]
        for line in qvm("qvm-prefs", name).stdout.splitlines()
    )
    assert not changed(qube_task(name, **wanted))
    assert not changed(qube_task(name, "--check", **wanted))
    assert not changed(qube_task(name, **{**wanted, "netvm": "None"}))


def test_changes_qubes_refuses_on_a_running_qube(qvm: Qvm, new_name: Callable[[], str]) -> None:
    """A template change of a running qube and a halted netvm for a running qube fail before
    anything changes, naming the qube and the rule; with state: halted the qube is shut down
    first, and the template changes."""
    template, netvm, name = new_name(), new_name(), new_name()
    qvm("qvm-create", "--class", "TemplateVM", "--label", "black", template)
    qvm(
        "qvm-create",
        "--label",
        "orange",
        "--prop",
        "provides_network=True",
        "--prop",
        "netvm=",
        netvm,
    )
    qube_task(name, label="red", netvm="", state="running")
    refused = qube_task(name, template=template, label="blue")
    assert refused.returncode != 0
    assert f"qube {name!r} is running" in refused.stdout
    assert "cannot change the template of a running qube" in refused.stdout
    to_halted = qube_task(name, "--check", netvm=netvm)
    assert to_halted.returncode != 0
    assert (
        f"cannot attach a running qube to a halted netvm; start {netvm!r} first" in to_halted.stdout
    )
    assert qvm("qvm-prefs", name, "label").stdout == "red\n"
    assert qvm("qvm-prefs", name, "netvm").stdout == ""
    assert changed(qube_task(name, template=template, state="halted"))
    assert qvm("qvm-prefs", name, "template").stdout == f"{template}\n"
    assert qvm("qvm-check", "--running", "--quiet", name, check=False).returncode == 1
