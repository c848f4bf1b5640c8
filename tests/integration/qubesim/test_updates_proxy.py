"""Templates download packages as in Qubes: they have no network, and their package manager goes
to a forwarder on their own loopback, which calls `qubes.UpdatesProxy` through dom0's policy; in
the updates qube (sys-net) that service is a TCP service bound to its tinyproxy. Also the qubesdb
type and default services these rest on, and qrexec's TCP services as upstream defines them."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.integration.conftest import Policy, Qvm, as_root, audit_since, run_tool

TEMPLATE = "debian-12"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, bytes]]:
    """A web server on the simulated host's loopback (the network sys-net has), and a file on it."""
    folder = tmp_path_factory.mktemp("web")
    content = os.urandom(300_000)
    (folder / "package.deb").write_bytes(content)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *arguments: object, **keywords: object) -> None:
            super().__init__(*arguments, directory=str(folder), **keywords)  # type: ignore[misc]

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], content
    server.shutdown()


@pytest.fixture(scope="module")
def appvm() -> Iterator[str]:
    name = f"u{os.getpid() % 10000}-app"
    run_tool("qvm-create", "--label", "red", "--property", "netvm=", name)
    yield name
    run_tool("qvm-remove", "--force", name, check=False)


def fetch_through_proxy(qube: str, url: str) -> bytes:
    """What the package manager does: a plain HTTP request to the proxy apt is configured with."""
    program = (
        "import re, sys, urllib.request\n"
        "setting = open('/etc/apt/apt.conf.d/01qubes-proxy').read()\n"
        'proxy = re.search(r\'Acquire::http::Proxy "([^"]+)"\', setting).group(1)\n'
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({'http': proxy}))\n"
        f"sys.stdout.buffer.write(opener.open({url!r}, timeout=30).read())\n"
    )
    result = subprocess.run(
        ["qvm-run", "--pass-io", qube, "python3 -"],
        input=program.encode(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_qubesdb_tells_each_qube_its_type(qvm: Qvm, appvm: str) -> None:
    # qubes-core-admin, qubes/ext/r3compatibility.py, on_domain_qdb_create.
    for qube, kind in (
        (TEMPLATE, "TemplateVM"),
        ("sys-net", "NetVM"),
        ("sys-firewall", "ProxyVM"),
        (appvm, "AppVM"),
    ):
        told = qvm("qvm-run", "--pass-io", qube, "qubesdb-read /qubes-vm-type").stdout
        assert told == f"{kind}\n", qube


def test_default_services_follow_the_type_and_qvm_service(qvm: Qvm, appvm: str) -> None:
    # qubes-core-agent-linux, vm-systemd/qubes-sysinit.sh: DEFAULT_ENABLED_* by type, then
    # /qubes-service/NAME = 0|1 from qubesdb.
    def services(qube: str) -> set[str]:
        return set(qvm("qvm-run", "--pass-io", qube, "ls /run/qubes-service").stdout.split())

    assert {"updates-proxy-setup", "qubes-update-check"} <= services(TEMPLATE)
    assert "qubes-updates-proxy" in services("sys-net")
    assert "qubes-updates-proxy" not in services("sys-firewall")
    assert not {"updates-proxy-setup", "qubes-updates-proxy"} & services(appvm)
    qvm("qvm-service", "--disable", appvm, "qubes-update-check")
    qvm("qvm-shutdown", "--wait", appvm)
    assert "qubes-update-check" not in services(appvm)


def test_a_template_downloads_through_the_updates_qube(qvm: Qvm, web: tuple[int, bytes]) -> None:
    # qubes-core-agent-linux: network/update-proxy-configs (apt's proxy), vm-systemd/
    # qubes-updates-proxy-forwarder.socket, qubes-rpc/Makefile (qubes.UpdatesProxy -> /dev/tcp/
    # 127.0.0.1/8082); qubes-core-admin, qubes-rpc-policy/90-default.policy.
    port, content = web
    started = datetime.now(UTC)
    qvm("qvm-start", "--skip-if-running", TEMPLATE)
    interfaces = qvm("qvm-run", "--pass-io", TEMPLATE, "ls /sys/class/net").stdout.split()
    assert interfaces == ["lo"]
    assert fetch_through_proxy(TEMPLATE, f"http://127.0.0.1:{port}/package.deb") == content
    calls = [entry for entry in audit_since(started) if entry["service"] == "qubes.UpdatesProxy"]
    assert calls and all(entry["source"] == TEMPLATE for entry in calls)
    assert {(entry["actual_target"], entry["decision"]) for entry in calls} == {
        ("sys-net", "allow")
    }
    assert {entry["rule"].rsplit(":", 1)[0] for entry in calls} == {
        "/etc/qubes/policy.d/90-default.policy"
    }


def test_a_qube_other_than_a_template_is_refused_the_proxy(qvm: Qvm, appvm: str) -> None:
    refused = qvm(
        "qvm-run", "--pass-io", appvm, "qrexec-client-vm '' qubes.UpdatesProxy", check=False
    )
    assert refused.returncode == 126


# -- qrexec's TCP services -------------------------------------------------------------------------
@pytest.fixture
def echo_server() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on sys-net's network that records what it received and answers 'pong'."""
    received: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                data = b""
                while chunk := connection.recv(4096):
                    data += chunk
                received.append(data)
                connection.sendall(b"pong")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], received
    listener.close()


def link_service(name: str, target: str, config: str | None = None) -> None:
    """A TCP service in sys-net's root (thrown away at its shutdown)."""
    as_root("sys-net", f"ln -sfn {target} /etc/qubes-rpc/{name}")
    if config is not None:
        as_root("sys-net", f"echo '{config}' > /etc/qubes/rpc-config/{name}")


def call(qvm: Qvm, policy: Policy, source: str, service: str) -> tuple[int, str]:
    policy(f"{service.split('+')[0]} * {source} sys-net allow")
    result = qvm(
        "qvm-run", "--pass-io", source, f"echo -n ping | qrexec-client-vm sys-net {service}",
        check=False,
    )  # fmt: skip
    return result.returncode, result.stdout


def test_tcp_services_take_their_address_from_the_link_and_the_argument(
    qvm: Qvm, policy: Policy, appvm: str, echo_server: tuple[int, list[bytes]]
) -> None:
    # qubes-core-qrexec, libqrexec/exec.c find_qrexec_service; doc/execution.rst "Symlinks to
    # /dev/tcp/": HOST/PORT ignores no argument, HOST takes the port from the argument, bare
    # /dev/tcp splits HOST+PORT on the last '+'; the descriptor is sent unless skipped.
    port, received = echo_server
    link_service("test.TcpFull", f"/dev/tcp/127.0.0.1/{port}", "skip-service-descriptor=true")
    link_service("test.TcpHost", "/dev/tcp/127.0.0.1")
    link_service("test.TcpBare", "/dev/tcp", "skip-service-descriptor=true")
    assert call(qvm, policy, appvm, "test.TcpFull") == (0, "pong")
    assert call(qvm, policy, appvm, f"test.TcpHost+{port}") == (0, "pong")
    assert call(qvm, policy, appvm, f"test.TcpBare+127.0.0.1+{port}") == (0, "pong")
    assert received == [b"ping", f"test.TcpHost+{port} {appvm}\0ping".encode(), b"ping"]

    for refused in ("test.TcpFull+1", "test.TcpHost", f"test.TcpHost+0{port}", "test.TcpBare+1"):
        code, output = call(qvm, policy, appvm, refused)
        assert code != 0 and output == "", refused
    assert len(received) == 3


def test_an_installed_package_file_is_known_to_the_package_manager(qvm: Qvm) -> None:
    # Qubes' templates carry split-GPG as a package (qubes-gpg-split), which qubesim installs.
    listed = qvm("qvm-run", "--pass-io", TEMPLATE, "dpkg-query -W -f='${Status}' qubes-gpg-split")
    assert listed.stdout == "install ok installed"
    owner = qvm("qvm-run", "--pass-io", TEMPLATE, "dpkg -S /usr/bin/qubes-gpg-client-wrapper")
    assert owner.stdout.startswith("qubes-gpg-split:")
