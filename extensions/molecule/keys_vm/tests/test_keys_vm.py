"""keys_vm: the LogReceived gate, the split-GPG window length, one signing key, no network."""

from __future__ import annotations

from typing import Any

testinfra_hosts = ["ansible://keys_vms"]


def test_log_received_is_installed_and_checks_its_caller(host: Any) -> None:
    service = host.file("/usr/local/etc/qubes-rpc/qubesbuilder.LogReceived")
    assert service.is_file and service.mode == 0o755
    assert "QREXEC_REMOTE_DOMAIN" in service.content_string


def test_one_secret_key_and_no_network(host: Any) -> None:
    keys = host.check_output("gpg --batch --with-colons --list-secret-keys")
    assert sum(line.startswith("sec:") for line in keys.splitlines()) == 1
    assert host.check_output("ls /sys/class/net") == "lo"
    assert "QUBES_GPG_AUTOACCEPT=300" in host.file("/home/user/.profile").content_string
