"""The ssh proxy on qubesim: build qubes reach the upload server, whose name only the net qube can
resolve, through local.ConnectSSH in the net qube; dom0's policy and the service itself refuse
every other host, and no qube outside the infrastructure may use the proxy."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from qubesim import world
from tests.integration.conftest import Policy, audit_since, run_tool
from tests.integration.converged.chain import BUILDER, Chain, build, in_qube, verify_signature

NET = "sys-net"
SERVICE = "/usr/local/etc/qubes-rpc/local.ConnectSSH"
UPLOAD = f"local.ConnectSSH+{world.UPLOAD_HOST}"


def close_connections(qube: str) -> None:
    """End the build qube's shared ssh connection, so that the next ssh makes a new call (and the
    call of the one that ends has its end in the audit log)."""
    in_qube(qube, f"ssh -O exit {world.UPLOAD_HOST} 2>/dev/null")


def calls(since: datetime, source: str, service: str, wait: float = 0) -> list[dict[str, object]]:
    """The audit entries of `service` called by `source` since then, waiting up to `wait` seconds
    for the first (a call is logged when dom0 decides it)."""
    deadline = time.monotonic() + wait
    while True:
        found = [
            entry
            for entry in audit_since(since)
            if entry["source"] == source and f"{entry['service']}+{entry['argument']}" == service
        ]
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.2)


def from_dom0(service: str) -> tuple[int, str, str]:
    """The service called from dom0 in the net qube (no policy applies), with empty input."""
    called = run_tool("qvm-run", "--pass-io", "--service", NET, service, input="", check=False)
    return called.returncode, called.stdout, called.stderr


def test_the_upload_host_settings_win_over_the_proxy_defaults(chain: Chain) -> None:
    # ssh -G prints the settings ssh would use: the host's own block (build_vm) comes first.
    settings = in_qube("build-fedora", f"ssh -G {world.UPLOAD_HOST}").stdout.splitlines()
    assert "user root" in settings
    assert "controlmaster auto" in settings
    assert f"proxycommand /usr/bin/qrexec-client-vm {NET} local.ConnectSSH+%h" in settings
    listed = in_qube(NET, "cat /usr/local/etc/qubes-infra-build/ssh-hosts").stdout.splitlines()
    assert [line for line in listed if not line.startswith("#")] == [
        "github.com 22",
        f"{world.UPLOAD_HOST} {world.UPLOAD_PORT}",
    ]


def test_the_upload_host_resolves_only_in_the_net_qube(chain: Chain) -> None:
    resolved = in_qube(NET, f"getent hosts {world.UPLOAD_HOST}")
    assert resolved.returncode == 0 and resolved.stdout.split()[0] == "127.0.0.1"
    for qube in ("build-fedora", "sys-firewall"):
        assert in_qube(qube, f"getent hosts {world.UPLOAD_HOST}").returncode != 0


def test_only_a_qube_holding_the_physical_network_learns_the_worlds_names(
    chain: Chain, new_name: Callable[[], str]
) -> None:
    holder, behind = new_name(), new_name()
    for name, netvm in ((holder, ""), (behind, "sys-firewall")):
        run_tool("qvm-create", "--label", "red", "--property", "provides_network=True",
                 "--property", f"netvm={netvm}", name)  # fmt: skip
    assert in_qube(holder, f"getent hosts {world.UPLOAD_HOST}").returncode == 0
    assert in_qube(behind, f"getent hosts {world.UPLOAD_HOST}").returncode != 0


def test_a_build_uploads_its_artifact_and_signature_through_the_proxy(chain: Chain) -> None:
    component = f"upload-{time.time_ns()}"
    close_connections("build-fedora")
    started = datetime.now(UTC)
    built = build("build-fedora", component)
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"uploaded {component}.tar and its signature to {world.UPLOAD_HOST}" in built.stdout

    uploaded = chain.world.uploads / f"{component}.tar"
    out = f"{BUILDER}/artifacts/{component}"
    artifact = in_qube("build-fedora", f"cat {out}/{component}.tar").stdout
    assert uploaded.read_text() == artifact
    signature = (chain.world.uploads / f"{component}.tar.asc").read_text()
    assert verify_signature(chain, "keys-fedora", artifact, signature)

    close_connections("build-fedora")
    [call] = calls(started, "build-fedora", UPLOAD, wait=30)
    assert (call["target"], call["actual_target"], call["decision"]) == (NET, NET, "allow")
    assert str(call["rule"]).startswith("/etc/qubes/policy.d/20-")


def test_ssh_to_a_host_not_listed_is_refused_by_policy(chain: Chain) -> None:
    started = datetime.now(UTC)
    refused = in_qube("build-fedora", "ssh -o BatchMode=yes elsewhere.example true")
    assert refused.returncode != 0
    [call] = calls(started, "build-fedora", "local.ConnectSSH+elsewhere.example")
    assert call["decision"] == "deny" and call["actual_target"] == ""


def test_the_service_connects_listed_hosts_only_when_called_directly(chain: Chain) -> None:
    code, banner, _ = from_dom0(UPLOAD)
    assert banner.startswith("SSH-2.0-"), (code, banner)
    for host in ("elsewhere.example", "localhost", "upload.qubesim", f"x{world.UPLOAD_HOST}"):
        code, output, error = from_dom0(f"local.ConnectSSH+{host}")
        assert code != 0 and output == ""
        assert error.strip().splitlines() == [
            f"local.ConnectSSH: refused: '{host}' is not an allowed ssh host "
            "(/usr/local/etc/qubes-infra-build/ssh-hosts)"
        ]
    code, output, error = from_dom0("local.ConnectSSH")
    assert code != 0 and output == "" and "refused" in error


def test_the_service_refuses_an_unlisted_host_that_a_wrong_policy_allows(
    chain: Chain, policy: Policy
) -> None:
    policy(f"local.ConnectSSH +localhost build-fedora {NET} allow", name="10-wrong-ssh.policy")
    started = datetime.now(UTC)
    refused = in_qube("build-fedora", f"qrexec-client-vm {NET} local.ConnectSSH+localhost")
    assert refused.returncode != 0 and refused.stdout == ""
    assert "is not an allowed ssh host" in refused.stderr
    [call] = calls(started, "build-fedora", "local.ConnectSSH+localhost")
    assert call["decision"] == "allow" and call["exit_code"] != 0


def test_a_qube_outside_the_infrastructure_cannot_use_the_proxy(chain: Chain, appvm: str) -> None:
    started = datetime.now(UTC)
    refused = in_qube(appvm, f"qrexec-client-vm {NET} {UPLOAD}")
    assert refused.returncode == 126 and refused.stdout == ""
    [call] = calls(started, appvm, UPLOAD)
    assert call["decision"] == "deny"
