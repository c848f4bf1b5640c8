"""The build environments' data model: what qubes they make, and which input is refused (with a
message naming the environment, the key and the rule)."""

from __future__ import annotations

from typing import Any

import pytest
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_envs import ConfigError, load

FPR = "427F11FD0FAA4B080123F01CDDFA1A3E36879494"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"
EXAMPLE: dict[str, Any] = {
    "build_infra_remote_hosts": {
        "yum.qubes-os.org": {"user": "user", "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"}
    },
    "build_infra_envs": {
        "fedora": {
            "volume_size": "20GiB",
            "sign_key": FPR.lower(),
            "builders": [
                {
                    "dir": "/home/user/builder-r4.2",
                    "release": "4.2",
                    "config_file": "R4.2/qubes-os-r4.2-host.conf",
                    "keys": [FPR],
                }
            ],
        },
        "kernel": {"logs": "logs-kernel"},
    },
}


def test_the_qubes_of_the_example() -> None:
    infrastructure = load(EXAMPLE)
    qubes = infrastructure.qubes()
    assert sorted(qubes) == [
        "build-fedora",
        "build-kernel",
        "build-logs",
        "keys-fedora",
        "keys-kernel",
        "logs-kernel",
    ]
    assert qubes["build-fedora"] == {
        "kind": "build",
        "env": "fedora",
        "class": "AppVM",
        "label": "green",
        "template": "fedora-43-xfce",
        "netvm": "sys-whonix",
        "volume_size": 20 * 1024**3,
    }
    assert qubes["keys-kernel"]["netvm"] is None
    assert qubes["keys-kernel"]["label"] == "black"
    assert qubes["logs-kernel"]["netvm"] == "sys-firewall"
    assert infrastructure.envs[0].sign_key == FPR  # normalised to upper case
    assert infrastructure.remote_hosts["yum.qubes-os.org"]["user"] == "user"


def test_upload_hosts_are_reached_on_port_22_unless_they_name_their_own() -> None:
    hosts = {
        "yum.qubes-os.org": {"host_key": KEY},
        "upload.example": {"user": "root", "host_key": KEY, "port": 10023},
    }
    infrastructure = load({"build_infra_remote_hosts": hosts})
    assert infrastructure.remote_hosts["yum.qubes-os.org"] == {
        "user": "user",
        "host_key": KEY,
        "port": 22,
    }
    assert infrastructure.remote_hosts["upload.example"]["port"] == 10023
    # GitHub first (it is always reachable), then the upload hosts by name.
    assert list(infrastructure.ssh_hosts.items()) == [
        ("github.com", 22),
        ("upload.example", 10023),
        ("yum.qubes-os.org", 22),
    ]


def test_defaults_without_any_variable() -> None:
    infrastructure = load({})
    assert (infrastructure.netvm, infrastructure.build_netvm, infrastructure.logs_netvm) == (
        "sys-net",
        "sys-whonix",
        "sys-firewall",
    )
    assert infrastructure.qubes() == {}


def with_env(**env: Any) -> dict[str, Any]:
    return {"build_infra_envs": {"fedora": env}}


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (with_env(colour="red"), "build_infra_envs.fedora: unknown key 'colour'"),
        ({"build_infra_envs": {"x" * 26: {}}}, "longer than 31 characters"),
        ({"build_infra_envs": {"fe.dora": {}}}, "must match ^[a-zA-Z][a-zA-Z0-9_-]*$"),
        (
            {"build_infra_envs": {"logs": {}}},
            "build_infra_envs.logs.logs: 'build-logs' is also the build qube of env 'logs'",
        ),
        (
            with_env(logs="keys-fedora"),
            "build_infra_envs.fedora.logs: 'keys-fedora' is also the keys qube",
        ),
        (with_env(logs="sys-net"), "'sys-net' is also build_infra_netvm"),
        (
            {"build_infra_netvm": "build-fedora", **with_env()},
            "build_infra_netvm: 'build-fedora' is also the build qube",
        ),
        (
            with_env(volume_size="20 parsecs"),
            "build_infra_envs.fedora.volume_size: size '20 parsecs'",
        ),
        (with_env(volume_size=0), "must be a positive number"),
        (
            with_env(sign_key="ABCD"),
            "build_infra_envs.fedora.sign_key: 'ABCD' is not a 40-hex-digit",
        ),
        (
            with_env(builders=[{"dir": "/b", "release": "R4.2", "config_file": "c"}]),
            "build_infra_envs.fedora.builders[0].release: 'R4.2' must look like 4.2",
        ),
        (
            with_env(builders=[{"dir": "b", "release": "4.2", "config_file": "c"}]),
            "builders[0].dir: 'b' must be an absolute path",
        ),
        (
            with_env(builders=[{"dir": "/b", "release": "4.2", "config_file": "../c"}]),
            "builders[0].config_file: '../c' must be a relative path",
        ),
        (
            with_env(builders=[{"dir": "/b", "release": "4.2", "config_file": "c", "keys": ["x"]}]),
            "builders[0].keys[0]: 'x' is not a 40-hex-digit",
        ),
        (
            with_env(builders=[{"dir": "/b", "release": "4.2", "config_file": "c", "extra": 1}]),
            "builders[0]: unknown key 'extra'",
        ),
        (
            {"build_infra_remote_hosts": {"bad host": {"host_key": "ssh-ed25519 AAAA"}}},
            "build_infra_remote_hosts.bad host: 'bad host' is not a valid host name",
        ),
        (
            {"build_infra_remote_hosts": {"h.example": {"host_key": "AAAA"}}},
            "build_infra_remote_hosts.h.example.host_key: expected 'TYPE BASE64'",
        ),
        *(
            (
                {"build_infra_remote_hosts": {"h.example": {"host_key": KEY, "port": port}}},
                f"build_infra_remote_hosts.h.example.port: {port!r} must be a TCP port",
            )
            for port in (0, 65536, "2222", True, None)
        ),
        (
            {"build_infra_build_template": "fedora 43"},
            "build_infra_build_template: qube name 'fedora 43'",
        ),
        ({"build_infra_envs": ["fedora"]}, "build_infra_envs: must be a mapping"),
        (
            {"build_infra_net_template": "debian 12"},
            "build_infra_net_template: qube name 'debian 12'",
        ),
        (
            {"build_infra_net_template": "build-fedora", **with_env()},
            "build_infra_net_template: 'build-fedora' is also the build qube of env 'fedora'",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(variables: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(variables)
    assert message in str(error.value)


def test_the_environments_of_some_qubes() -> None:
    infrastructure = load(EXAMPLE)
    assert infrastructure.envs_of(["dom0", "keys-kernel", "build-logs"]) == ["kernel"]
    assert infrastructure.envs_of(["dom0", "logs-kernel", "sys-net"]) == []
    assert sorted(infrastructure.qubes({"kernel"})) == [
        "build-kernel",
        "keys-kernel",
        "logs-kernel",
    ]
