"""A qube sees its own files and network only."""

from __future__ import annotations

import os

from tests.integration.conftest import Qvm, as_root


def test_qube_identity(qvm: Qvm, appvm: str) -> None:
    out = qvm(
        "qvm-run", "--pass-io", appvm, "hostname; qubesdb-read /name; id -un; id -u; echo $HOME"
    ).stdout
    assert out.split() == [appvm, appvm, "user", "1000", "/home/user"]


def test_netvm_none_has_only_loopback(qvm: Qvm, isolated_appvm: str) -> None:
    interfaces = qvm("qvm-run", "--pass-io", isolated_appvm, "ls /sys/class/net").stdout.split()
    assert interfaces == ["lo"]


def test_networked_qube_shares_the_host_network(qvm: Qvm, appvm: str, isolated_appvm: str) -> None:
    # The network namespace the simulated host runs in (the machine's, or one of its own as
    # make test's lanes give it): dom0's /sys may show another, so compare the namespaces.
    host_network = os.readlink("/proc/self/ns/net")
    networked = qvm("qvm-run", "--pass-io", appvm, "readlink /proc/self/ns/net").stdout.strip()
    isolated = qvm("qvm-run", "--pass-io", isolated_appvm, "readlink /proc/self/ns/net").stdout
    assert networked == host_network
    assert isolated.strip() != host_network


def test_qube_cannot_see_simulator_dom0_or_other_qubes(
    qvm: Qvm, appvm: str, isolated_appvm: str
) -> None:
    home = os.environ.get("QUBESIM_HOME", "/var/lib/qubesim")
    qvm("qvm-run", "--pass-io", isolated_appvm, "echo secret > /home/user/secret")
    probe = (
        f"ls -d {home} 2>/dev/null; "
        "grep -rl secret /home /rw 2>/dev/null; "
        "find / -xdev -name secret 2>/dev/null; "
        "ls /etc/qubes/policy.d 2>/dev/null; "
        "echo done"
    )
    out = as_root(appvm, probe).stdout
    assert out == "done\n"


def test_root_in_a_qube_cannot_mount(qvm: Qvm, appvm: str) -> None:
    result = as_root(
        appvm,
        "mount -t tmpfs none /mnt 2>&1; echo rc=$?",
        check=False,
    )
    assert "rc=0" not in result.stdout
