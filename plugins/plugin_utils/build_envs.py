# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The build environments, from the `build_infra_*` variables: validation and the qubes they make.

One implementation for the inventory plugin, the preflight's action and the roles' filters.
Validation happens at once, before anything changes, and every error names the environment (or
variable), the key and the rule. Controller only; standard library and the collection's own
code, no other Ansible import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

from ansible_collections.qubes_infra.build.plugins.module_utils.sizes import SizeError, parse_size

NAME_MAX = 31
_QUBE_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]*\Z")
_RELEASE = re.compile(r"[0-9]+\.[0-9]+\Z")
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{40}\Z")
_HOST = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
_HOST_KEY = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}\Z"
)

DEFAULTS = {
    "build_infra_netvm": "sys-net",
    "build_infra_build_template": "fedora-43-xfce",
    "build_infra_keys_template": "fedora-43-minimal",
    "build_infra_logs_template": "fedora-43-xfce",
    "build_infra_build_netvm": "sys-whonix",
    "build_infra_logs_netvm": "sys-firewall",
    # The template of build_infra_netvm, given the net qube's packages (webhooks, ssh proxy); ""
    # leaves that template alone (the net qube is not ours: its template may serve others).
    "build_infra_net_template": "",
    "build_infra_remote_hosts": {},
    "build_infra_envs": {},
}
ENV_KEYS = ("logs", "volume_size", "sign_key", "builders")
BUILDER_KEYS = ("dir", "release", "config_file", "config_repo", "keys")
REMOTE_HOST_KEYS = ("user", "host_key", "port")
SSH_PORT = 22
GITHUB = "github.com"
DEFAULT_LOGS = "build-logs"
LABELS = {"build": "green", "keys": "black", "logs": "green"}


class ConfigError(ValueError):
    """Invalid build_infra_* variables; the message names where and which rule."""


@dataclass(frozen=True)
class Builder:
    dir: str
    release: str
    config_file: str
    config_repo: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Env:
    name: str
    logs: str
    volume_size: int | None
    sign_key: str | None
    builders: tuple[Builder, ...]

    @property
    def build_vm(self) -> str:
        return f"build-{self.name}"

    @property
    def keys_vm(self) -> str:
        return f"keys-{self.name}"

    def describe(self) -> dict[str, Any]:
        """The environment with its defaults applied and the names of its qubes."""
        return {
            **asdict(self),
            "builders": [asdict(builder) for builder in self.builders],
            "build_vm": self.build_vm,
            "keys_vm": self.keys_vm,
        }


@dataclass(frozen=True)
class Infrastructure:
    netvm: str
    build_template: str
    keys_template: str
    logs_template: str
    build_netvm: str
    logs_netvm: str
    net_template: str = ""
    remote_hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    envs: tuple[Env, ...] = ()

    @property
    def ssh_hosts(self) -> dict[str, int]:
        """The hosts build qubes reach over ssh through the net qube, with their ports: GitHub
        first, then the upload hosts in name order."""
        ports = {GITHUB: SSH_PORT}
        ports.update((host, self.remote_hosts[host]["port"]) for host in sorted(self.remote_hosts))
        return ports

    def qubes(self, names: Collection[str] | None = None) -> dict[str, dict[str, Any]]:
        """The qubes the environments need (those named, or all), with their intended
        properties; a logs qube comes with any environment that logs to it."""
        envs = [env for env in self.envs if names is None or env.name in names]
        result: dict[str, dict[str, Any]] = {}
        for env in envs:
            result[env.build_vm] = _qube(
                "build", env.name, self.build_template, self.build_netvm, env.volume_size
            )
            result[env.keys_vm] = _qube("keys", env.name, self.keys_template, None, None)
        for logs in sorted({env.logs for env in envs}):
            result[logs] = _qube("logs", None, self.logs_template, self.logs_netvm, None)
        return result

    @property
    def templates(self) -> dict[str, list[str]]:
        """The templates the site configures, each with the kinds of qube it serves (build,
        keys, logs, net), in that order; the net qube's template only when one is named."""
        kinds: dict[str, list[str]] = {}
        for kind, template in (
            ("build", self.build_template),
            ("keys", self.keys_template),
            ("logs", self.logs_template),
            ("net", self.net_template),
        ):
            if template:
                kinds.setdefault(template, []).append(kind)
        return kinds

    def configured_qubes(self) -> dict[str, str]:
        """Every qube the site configures, with what it is to the infrastructure: the build,
        keys and logs qubes, the templates and the net qube."""
        configured: dict[str, str] = {}
        for env in self.envs:
            configured[env.build_vm] = f"the build qube of env {env.name!r}"
            configured[env.keys_vm] = f"the keys qube of env {env.name!r}"
        for logs in sorted({env.logs for env in self.envs}):
            configured.setdefault(logs, "a logs qube of the infrastructure")
        configured.setdefault(self.netvm, "the net qube of the infrastructure")
        for template, kinds in self.templates.items():
            configured.setdefault(
                template, f"the {' and '.join(kinds)} template of the infrastructure"
            )
        return configured

    def envs_of(self, qubes: Collection[str]) -> list[str]:
        """The environments whose build or keys qube is among `qubes` (a logs qube may serve
        several environments, so it names none)."""
        return [env.name for env in self.envs if {env.build_vm, env.keys_vm} & set(qubes)]


def _qube(
    kind: str, env: str | None, template: str, netvm: str | None, size: int | None
) -> dict[str, Any]:
    return {
        "kind": kind,
        "env": env,
        "class": "AppVM",
        "label": LABELS[kind],
        "template": template,
        "netvm": netvm,
        "volume_size": size,
    }


# -- validation -----------------------------------------------------------------------------------
def qube_name(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: a qube name is required (a non-empty string)")
    if len(value) > NAME_MAX:
        raise ConfigError(f"{where}: qube name {value!r} is longer than {NAME_MAX} characters")
    if not _QUBE_NAME.match(value):
        raise ConfigError(f"{where}: qube name {value!r} must match ^[a-zA-Z][a-zA-Z0-9_-]*$")
    return value


def _size(value: object, where: str) -> int:
    try:
        return parse_size(value, where)
    except SizeError as error:
        raise ConfigError(str(error)) from None


def _fingerprint(value: object, where: str) -> str:
    text = str(value).replace(" ", "") if isinstance(value, str) else ""
    if not _FINGERPRINT.match(text):
        raise ConfigError(f"{where}: {value!r} is not a 40-hex-digit OpenPGP fingerprint")
    return text.upper()


def _mapping(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping")
    return value


def _no_unknown_keys(value: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")


def _builder(value: object, where: str) -> Builder:
    data = _mapping(value, where)
    _no_unknown_keys(data, BUILDER_KEYS, where)
    directory = data.get("dir")
    if (
        not isinstance(directory, str)
        or not directory.startswith("/")
        or ".." in directory.split("/")
    ):
        raise ConfigError(f"{where}.dir: {directory!r} must be an absolute path without '..'")
    release = str(data.get("release", ""))
    if not _RELEASE.match(release):
        raise ConfigError(f"{where}.release: {data.get('release')!r} must look like 4.2")
    config_file = data.get("config_file")
    if (
        not isinstance(config_file, str)
        or not config_file
        or config_file.startswith("/")
        or (".." in config_file.split("/"))
    ):
        raise ConfigError(
            f"{where}.config_file: {config_file!r} must be a relative path without '..'"
        )
    keys = data.get("keys") or []
    if not isinstance(keys, list):
        raise ConfigError(f"{where}.keys: must be a list of fingerprints")
    return Builder(
        dir=directory.rstrip("/") or "/",
        release=release,
        config_file=config_file,
        config_repo=str(
            data.get("config_repo") or "https://github.com/QubesOS/qubes-release-configs"
        ),
        keys=tuple(_fingerprint(key, f"{where}.keys[{index}]") for index, key in enumerate(keys)),
    )


def _env(name: object, value: object) -> Env:
    where = f"build_infra_envs.{name}"
    if not isinstance(name, str):
        raise ConfigError(f"{where}: an environment name must be a string")
    data = _mapping(value, where)
    _no_unknown_keys(data, ENV_KEYS, where)
    qube_name(f"build-{name}", f"{where}: the build qube name")
    qube_name(f"keys-{name}", f"{where}: the keys qube name")
    builders = data.get("builders") or []
    if not isinstance(builders, list):
        raise ConfigError(f"{where}.builders: must be a list")
    size = data.get("volume_size")
    sign_key = data.get("sign_key")
    return Env(
        name=name,
        logs=qube_name(data.get("logs") or DEFAULT_LOGS, f"{where}.logs"),
        volume_size=None if size is None else _size(size, f"{where}.volume_size"),
        sign_key=None if sign_key is None else _fingerprint(sign_key, f"{where}.sign_key"),
        builders=tuple(_builder(b, f"{where}.builders[{i}]") for i, b in enumerate(builders)),
    )


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: {value!r} must be a TCP port, an integer from 1 to 65535")
    return value


def _remote_hosts(value: object) -> dict[str, dict[str, Any]]:
    hosts = _mapping(value, "build_infra_remote_hosts")
    result = {}
    for host, settings in hosts.items():
        where = f"build_infra_remote_hosts.{host}"
        if not isinstance(host, str) or not _HOST.match(host):
            raise ConfigError(f"{where}: {host!r} is not a valid host name")
        data = _mapping(settings, where)
        _no_unknown_keys(data, REMOTE_HOST_KEYS, where)
        user = data.get("user", "user")
        if not isinstance(user, str) or not _USER.match(user):
            raise ConfigError(f"{where}.user: {user!r} is not a valid user name")
        host_key = data.get("host_key")
        if not isinstance(host_key, str) or not _HOST_KEY.match(host_key.strip()):
            raise ConfigError(
                f"{where}.host_key: expected 'TYPE BASE64' such as 'ssh-ed25519 AAAA...'"
            )
        result[host] = {
            "user": user,
            "host_key": host_key.strip(),
            "port": _port(data.get("port", SSH_PORT), f"{where}.port"),
        }
    return result


def _check_distinct(infrastructure: Infrastructure) -> None:
    """No two qubes may end up with the same name (an env `logs` would make build-logs)."""
    owners: dict[str, str] = {}
    for env in infrastructure.envs:
        for role, qube in (("build qube", env.build_vm), ("keys qube", env.keys_vm)):
            owners.setdefault(qube, f"the {role} of env {env.name!r}")
    service = {
        infrastructure.netvm: "build_infra_netvm",
        infrastructure.build_netvm: "build_infra_build_netvm",
        infrastructure.logs_netvm: "build_infra_logs_netvm",
        infrastructure.build_template: "build_infra_build_template",
        infrastructure.keys_template: "build_infra_keys_template",
        infrastructure.logs_template: "build_infra_logs_template",
    }
    if infrastructure.net_template:
        service.setdefault(infrastructure.net_template, "build_infra_net_template")
    for env in infrastructure.envs:
        other = owners.get(env.logs) or service.get(env.logs)
        if other:
            raise ConfigError(f"build_infra_envs.{env.name}.logs: {env.logs!r} is also {other}")
    for name, variable in service.items():
        if name in owners:
            raise ConfigError(f"{variable}: {name!r} is also {owners[name]}")


def settings(variables: dict[str, Any]) -> dict[str, Any]:
    """The build_infra_* variables among `variables`, with the defaults of those not given: what
    Ansible resolves for every host when nothing else sets them."""
    given = {key: value for key, value in variables.items() if str(key).startswith("build_infra_")}
    return {**DEFAULTS, **given}


MODEL = "build_infra"


def model(infrastructure: Infrastructure, variables: dict[str, Any]) -> dict[str, Any]:
    """The normalised infrastructure as plain data (the value of the MODEL variable), with the
    settings it was made from."""
    return json.loads(
        json.dumps(
            {
                "settings": settings(variables),
                "netvm": infrastructure.netvm,
                "build_template": infrastructure.build_template,
                "keys_template": infrastructure.keys_template,
                "logs_template": infrastructure.logs_template,
                "net_template": infrastructure.net_template,
                "build_netvm": infrastructure.build_netvm,
                "logs_netvm": infrastructure.logs_netvm,
                "remote_hosts": infrastructure.remote_hosts,
                "ssh_hosts": infrastructure.ssh_hosts,
                "envs": {env.name: env.describe() for env in infrastructure.envs},
                "qubes": infrastructure.qubes(),
                "templates": infrastructure.templates,
            }
        )
    )


def host_variables(
    infrastructure: Infrastructure, variables: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Every host the infrastructure has (dom0, its qubes, the net qube, the templates) with the
    variables of this collection the inventory gives it: the model, and what the host is."""
    published = {MODEL: model(infrastructure, variables)}
    hosts: dict[str, dict[str, Any]] = {"dom0": dict(published)}
    for name, qube in infrastructure.qubes().items():
        hosts[name] = {**published, "build_infra_qube": qube}
        if qube["env"]:
            hosts[name]["build_infra_env"] = qube["env"]
    hosts.setdefault(infrastructure.netvm, dict(published))
    for template, kinds in infrastructure.templates.items():
        hosts.setdefault(template, dict(published))["build_infra_template_kinds"] = kinds
    return hosts


def load(variables: dict[str, Any]) -> Infrastructure:
    """Validate the build_infra_* variables (defaults applied) and return the infrastructure."""
    values = {key: variables.get(key, default) for key, default in DEFAULTS.items()}
    for key in (
        "build_infra_netvm",
        "build_infra_build_template",
        "build_infra_keys_template",
        "build_infra_logs_template",
        "build_infra_build_netvm",
        "build_infra_logs_netvm",
    ):
        qube_name(values[key], key)
    if values["build_infra_net_template"]:
        qube_name(values["build_infra_net_template"], "build_infra_net_template")
    envs = _mapping(values["build_infra_envs"], "build_infra_envs")
    infrastructure = Infrastructure(
        netvm=values["build_infra_netvm"],
        build_template=values["build_infra_build_template"],
        keys_template=values["build_infra_keys_template"],
        logs_template=values["build_infra_logs_template"],
        build_netvm=values["build_infra_build_netvm"],
        logs_netvm=values["build_infra_logs_netvm"],
        net_template=values["build_infra_net_template"] or "",
        remote_hosts=_remote_hosts(values["build_infra_remote_hosts"]),
        envs=tuple(
            _env(name, value) for name, value in sorted(envs.items(), key=lambda i: str(i[0]))
        ),
    )
    _check_distinct(infrastructure)
    return infrastructure
