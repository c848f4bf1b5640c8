"""ssh_proxy in the net qube: local.ConnectSSH connects only to the listed hosts."""

from __future__ import annotations

from typing import Any

testinfra_hosts = ["ansible://net_vms"]


def test_the_net_qube_serves_the_proxy_for_listed_hosts_only(host: Any) -> None:
    service = host.file("/usr/local/etc/qubes-rpc/local.ConnectSSH")
    assert service.is_file and service.user == "root" and service.mode == 0o755
    assert "github.com" in host.file("/usr/local/etc/qubes-infra-build/ssh-hosts").content_string
    refused = host.run("/usr/local/etc/qubes-rpc/local.ConnectSSH elsewhere.example </dev/null")
    assert refused.rc != 0 and refused.stdout == ""
