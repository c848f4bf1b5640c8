"""Root in a qube through the collection's plugins, as both releases honour it: asked for over
qrexec (`qvm-run --user root`), never through sudo, which Qubes' minimal templates refuse (they
lack qubes-core-agent-passwordless-root)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import Qvm
from tests.integration.plugins.connection.test_qubes_connection import ansible, write_inventory

MINIMAL = "debian-12-minimal"
BECOME = "qubes_infra.build.qubes"


@pytest.fixture
def minimal_appvm(qvm: Qvm, new_name: Callable[[], str]) -> str:
    name = new_name()
    qvm("qvm-create", "--label", "red", "--template", MINIMAL, "--property", "netvm=", name)
    return name


def users(result_stdout: str) -> list[str]:
    """The `id -u` outputs of an ad-hoc run with one-line output (`HOST | CHANGED | rc=0 >>`)."""
    return [line.strip() for line in result_stdout.splitlines() if line.strip().isdigit()]


def test_sudo_is_refused_in_a_qube_of_a_minimal_template(
    minimal_appvm: str, tmp_path: Path
) -> None:
    inventory = write_inventory(tmp_path / "hosts.yml", [minimal_appvm])
    result = ansible("ansible", inventory, minimal_appvm, "-b", "-m", "command", "-a", "id -u")
    assert result.returncode != 0
    assert "password is required" in result.stdout + result.stderr


@pytest.mark.parametrize("template", [MINIMAL, "debian-12"])
def test_the_qubes_become_method_gives_root_without_sudo(
    qvm: Qvm, new_name: Callable[[], str], tmp_path: Path, template: str
) -> None:
    qube = new_name()
    qvm("qvm-create", "--label", "red", "--template", template, "--property", "netvm=", qube)
    inventory = write_inventory(tmp_path / "hosts.yml", [qube], ansible_become_method=BECOME)
    playbook = tmp_path / "play.yml"
    tasks = [
        {"name": "As the connection's user", "command": "id -u", "register": "plain"},
        {"name": "As root", "command": "id -u", "become": True, "register": "root"},
        {"name": "A file as root", "copy": {"content": "x", "dest": "/etc/qubes-infra-root"},
         "become": True},
        {"name": "Both streams", "debug": {"msg": "{{ plain.stdout }}/{{ root.stdout }}"}},
    ]  # fmt: skip
    playbook.write_text(json.dumps([{"hosts": "all", "gather_facts": False, "tasks": tasks}]))
    result = ansible("ansible-playbook", inventory, str(playbook))
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"msg": "1000/0"' in result.stdout
    owner = qvm("qvm-run", "--pass-io", "--user", "root", qube, "stat -c %U /etc/qubes-infra-root")
    assert owner.stdout.strip() == "root"


def test_ansible_user_root_runs_as_root(minimal_appvm: str, tmp_path: Path) -> None:
    # 4.2's qubes.VMRootShell has no forced user: the plugin asks qvm-run for root.
    inventory = write_inventory(tmp_path / "hosts.yml", [minimal_appvm], ansible_user="root")
    result = ansible("ansible", inventory, minimal_appvm, "-m", "command", "-a", "id -u")
    assert result.returncode == 0, result.stdout + result.stderr
    assert users(result.stdout) == ["0"]


def test_the_become_method_refuses_to_run_as_another_user_elsewhere(tmp_path: Path) -> None:
    # With any other connection the command would run as that connection's user: it stops.
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
    result = ansible(
        "ansible", inventory, "localhost", "-b", "--become-method", BECOME,
        "--become-user", "nobody", "-m", "command", "-a", "touch /tmp/qubes-infra-never",
    )  # fmt: skip
    assert result.returncode != 0
    assert f"become method {BECOME} needs the {BECOME} connection" in result.stdout
    assert not Path("/tmp/qubes-infra-never").exists()
