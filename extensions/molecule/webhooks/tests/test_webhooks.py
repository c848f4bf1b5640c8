"""webhooks: nginx, the receiver and the worker run in the net qube as systemd units, started at
boot from rc.local, with the secret readable by the receiver's user only and the list of build
qubes to call."""

from __future__ import annotations

from typing import Any

testinfra_hosts = ["ansible://net_vms"]


def test_the_receiver_answers_and_refuses_an_unsigned_request(host: Any) -> None:
    status = host.check_output(
        "curl -s -o /dev/null -w '%{http_code}' -X POST -H 'X-GitHub-Event: push'"
        " -d '{}' http://127.0.0.1/api/services/trigger_build"
    )
    assert status == "403"


def test_the_services_are_active_units(host: Any) -> None:
    for service in ("nginx", "receiver", "worker"):
        assert host.service(f"qubes-infra-webhooks-{service}.service").is_running
    assert host.service("nginx.service").is_running is False


def test_started_from_rc_local_with_a_private_secret(host: Any) -> None:
    assert host.file("/rw/config/rc.local").contains("systemctl start qubes-infra-webhooks.target")
    secrets = host.check_output("find /usr/local/etc -name webhooks-secret -printf '%u %m\\n'")
    assert secrets == "user 600"
    listed = host.check_output("find /home/user/.config -name build-vms.list -exec cat {} +")
    assert listed.split() == ["build-fedora", "build-kernel"]
