"""The webhooks role's systemd units, rendered as the role renders them: one target and three
services that agree with each other and with nginx's configuration on names and paths, each
restarted when it ends and sandboxed."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.unit.roles.rendering import environment, render_template, role_file
from tests.unit.services import RECEIVER_APPLICATION, SERVICES

ROLE = "webhooks"
VARIABLES = {"webhooks_secret": "s" * 32, "webhooks_build_vms": ["build-fedora"]}
Unit = dict[str, dict[str, list[str]]]


def role_values() -> dict[str, Any]:
    """The role's defaults and vars, its own `{{ ... }}` values rendered."""
    values = {**role_file(ROLE, "defaults/main.yml"), **role_file(ROLE, "vars/main.yml")}
    values.update(VARIABLES)
    for name, value in values.items():
        if isinstance(value, str) and "{{" in value:
            values[name] = environment().from_string(value).render(**values)
    return values


VALUES = role_values()
UNITS = VALUES["_webhooks_units"]
TARGET = VALUES["_webhooks_target"]


def parse(text: str) -> Unit:
    """A unit file's sections and their keys, each with its values in order."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, value = line.split("=", 1)
        section.setdefault(key, []).append(re.sub(r"\s+", " ", value.strip()))
    return unit


def rendered(name: str) -> Unit:
    return parse(render_template(ROLE, f"{name}.j2", **VALUES))


def one(section: dict[str, list[str]], key: str) -> str:
    [value] = section[key]
    return value


def test_the_target_wants_the_three_services_and_each_is_part_of_it() -> None:
    target = rendered(TARGET)
    assert one(target["Unit"], "Wants").split() == list(UNITS.values())
    assert "Install" not in target  # started from rc.local: /usr/local is bound after boot
    for name in UNITS.values():
        assert one(rendered(name)["Unit"], "PartOf") == TARGET


@pytest.mark.parametrize("name", UNITS.values())
def test_each_service_comes_back_and_runs_sandboxed(name: str) -> None:
    service = rendered(name)["Service"]
    assert service["Restart"] == ["always"] and service["RestartSec"] == ["1"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "read-only",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictNamespaces": "yes",
    }.items():
        assert service[key] == [value], (name, key)
    [writable] = service["ReadWritePaths"]
    assert writable.startswith(VALUES["_webhooks_state_dir"])


def test_the_receiver_and_the_worker_run_as_the_user_without_privilege_or_network() -> None:
    for name in (UNITS["receiver"], UNITS["worker"]):
        service = rendered(name)["Service"]
        assert service["User"] == service["Group"] == [VALUES["_webhooks_service_user"]]
        assert service["CapabilityBoundingSet"] == [""]
        assert service["PrivateNetwork"] == ["yes"]
        assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    # qrexec-client-vm opens its data channel through Xen's devices.
    worker = rendered(UNITS["worker"])["Service"]
    assert "PrivateDevices" not in worker and "ProtectClock" not in worker
    assert "DevicePolicy" not in worker and "DeviceAllow" not in worker


def test_nginx_reaches_the_receiver_and_keeps_its_files_in_its_runtime_and_state_folders() -> None:
    receiver = rendered(UNITS["receiver"])["Service"]
    nginx = rendered(UNITS["nginx"])["Service"]
    configuration = render_template(ROLE, "webhooks-nginx.conf.j2", **VALUES)
    [socket] = re.findall(r"--bind unix:(\S+)", one(receiver, "ExecStart"))
    assert f"proxy_pass http://unix:{socket};" in configuration
    assert socket == "/run/" + one(receiver, "RuntimeDirectory") + "/receiver.sock"
    runtime = "/run/" + one(nginx, "RuntimeDirectory")
    assert one(nginx, "PIDFile") == f"{runtime}/nginx.pid"
    assert f"pid {runtime}/nginx.pid;" in configuration
    temporary = dict(re.findall(r"^\s*(\w+)_temp_path (\S+);", configuration, re.MULTILINE))
    # Request bodies on disk, in the unit's state folder; /run is RAM.
    body = temporary.pop("client_body")
    assert body == "/var/lib/" + one(nginx, "StateDirectory") + "/body"
    assert len(temporary) == 4 and all(
        path.startswith(f"{runtime}/") for path in temporary.values()
    )
    # The firewall step runs as root outside the sandbox; nginx itself gets no CAP_NET_ADMIN.
    assert nginx["ExecStartPre"] == [f"+{VALUES['_webhooks_firewall']}"]
    assert "CAP_NET_ADMIN" not in one(nginx, "CapabilityBoundingSet")
    assert one(nginx, "ExecStart").endswith(f"-c {VALUES['webhooks_etc_dir']}/webhooks-nginx.conf")


def test_the_services_log_where_the_worker_bounds_it() -> None:
    settings = json.loads(render_template(ROLE, "webhooks.json.j2", **VALUES))
    [services_log] = settings["service_logs"]
    worker = rendered(UNITS["worker"])["Service"]
    assert worker["StandardOutput"] == worker["StandardError"] == [f"append:{services_log}"]
    receiver = rendered(UNITS["receiver"])["Service"]
    assert f"--error-logfile {services_log} " in one(receiver, "ExecStart")
    configuration = render_template(ROLE, "webhooks-nginx.conf.j2", **VALUES)
    assert f"error_log {services_log} crit;" in configuration
    assert rendered(UNITS["nginx"])["Service"]["ReadWritePaths"] == [services_log]


def test_the_units_run_the_services_package_as_its_tests_do() -> None:
    """gunicorn serves the package's receiver from the programs' folder, where the role puts the
    package; the worker's unit runs the entry point the role copies there."""
    lib = VALUES["webhooks_lib_dir"]
    assert VALUES["_webhooks_package_dir"] == f"{lib}/qubes_infra_services"
    receiver = one(rendered(UNITS["receiver"])["Service"], "ExecStart")
    assert receiver.endswith(f"--chdir {lib} {RECEIVER_APPLICATION}")
    worker = one(rendered(UNITS["worker"])["Service"], "ExecStart")
    assert worker == f"/usr/bin/python3 {lib}/webhook_worker.py"
    assert (SERVICES / VALUES["_webhooks_worker_program"]).is_file()
