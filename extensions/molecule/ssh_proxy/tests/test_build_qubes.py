"""ssh_proxy in the build qubes: every ssh connection goes through the net qube's proxy."""

from __future__ import annotations

from typing import Any

testinfra_hosts = ["ansible://build_vms"]


def test_build_qubes_send_ssh_through_the_net_qube(host: Any) -> None:
    settings = host.check_output("ssh -G github.com")
    assert "proxycommand /usr/bin/qrexec-client-vm sys-net local.ConnectSSH+%h" in settings
    assert host.file("/home/user/.ssh").mode == 0o700
