# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The build environments, from the `build_infra_*` variables: validation and the qubes they make.

One implementation for the inventory plugin and the roles. Validation happens at once, before
anything changes, and every error names the environment (or variable), the key and the rule.
Standard library only; no Ansible import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

NAME_MAX = 31
_QUBE_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]*\Z")
_RELEASE = re.compile(r"[0-9]+\.[0-9]+\Z")
_FINGERPRINT = re.compile(r"[0-9A-Fa-f]{40}\Z")
_SIZE = re.compile(r"([0-9]+)\s*([KMGT]i?B?|B?)\Z", re.IGNORECASE)
_HOST = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")
_HOST_KEY = re.compile(
    r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}\Z"
)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "KI": 1024,
    "MI": 1024**2,
    "GI": 1024**3,
    "TI": 1024**4,
}

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


def parse_size(value: object, where: str) -> int:
    text = (
        str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    )
    match = _SIZE.match(text)
    if not match or int(match.group(1)) == 0:
        raise ConfigError(
            f"{where}: size {value!r} must be a positive number with an optional unit "
            "(for example 20GiB, 512MiB, 10G)"
        )
    unit = match.group(2).upper().rstrip("B")
    return int(match.group(1)) * _UNITS[unit]


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
        volume_size=None if size is None else parse_size(size, f"{where}.volume_size"),
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


# -- dom0 policy -----------------------------------------------------------------------------------
INFRA_TAG = "qubes-infra-build"
INFRA_SERVICES = (
    "qubesbuilder.BuildLog",
    "qubesbuilder.LogReceived",
    "qubesbuilder.TriggerBuild",
    "qubesbuilder.ProcessGithubCommand",
    "local.ConnectSSH",
)


# The policy file is made of sections, each opened by one of these comments: one per environment,
# then the rules of every environment. A run limited to some environments rewrites their sections
# and keeps the others as installed.
ENV_SECTION = "# Environment {name}: build logs, signing, webhooks and ssh of its qubes."
SHARED_SECTION = "# Every environment: admin qubes, then nothing else to or among these qubes."
_SECTION = re.compile(r"# (?:Environment (?P<env>[A-Za-z0-9_-]+)|Every environment):")


class PolicyFileError(ValueError):
    """An installed policy file this collection cannot split into its sections."""


ADMIN_QUBES = "dom0_admin_qubes"


def validate_admin_qubes(infrastructure: Infrastructure, value: object) -> tuple[str, ...]:
    """The admin qubes named in dom0_admin_qubes, each once, or ConfigError naming the entry and
    the rule: a qube name (no policy keyword, which would stand for other qubes too), not dom0,
    and none of the qubes the infrastructure configures (an admin qube must be a qube of its own,
    or a qube of the infrastructure would drive all the others)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{ADMIN_QUBES}: must be a list of qube names, not {value!r}")
    configured = infrastructure.configured_qubes()
    admins: list[str] = []
    for entry in value:
        if isinstance(entry, str) and entry.startswith("@"):
            raise ConfigError(
                f"{ADMIN_QUBES}: {entry!r} is not a qube name: policy keywords (@anyvm,"
                " @tag:..., @type:..., @adminvm, @dispvm...) stand for other qubes too; name"
                " each admin qube"
            )
        if entry == "dom0":
            raise ConfigError(
                f"{ADMIN_QUBES}: 'dom0' is not a qube to name here: dom0 is not subject to"
                " policy and reaches every qube already; name only admin qubes besides dom0"
            )
        qube_name(entry, ADMIN_QUBES)
        if entry in configured:
            raise ConfigError(
                f"{ADMIN_QUBES}: {entry!r} is {configured[entry]}; an admin qube must be a qube"
                " of its own"
            )
        if entry not in admins:
            admins.append(entry)
    return tuple(admins)


def env_policy_rules(infrastructure: Infrastructure, env: Env) -> list[str]:
    """The section of one environment: each of its flows (DESIGN.md), and no other."""
    net = infrastructure.netvm
    return [
        ENV_SECTION.format(name=env.name),
        # Build logs go to the logs qube; its receipt opens the signing window in keys-ENV.
        f"qubesbuilder.BuildLog * {env.build_vm} dom0 allow target={env.logs}",
        f"qubesbuilder.LogReceived +{env.build_vm} {env.logs} dom0 allow target={env.keys_vm}",
        # Split-GPG: the build qube signs with its own keys qube only.
        f"qubes.Gpg * {env.build_vm} {env.keys_vm} allow",
        f"qubes.Gpg * {env.build_vm} @default allow target={env.keys_vm}",
        # Webhooks received in the net qube start builds.
        f"qubesbuilder.TriggerBuild * {net} {env.build_vm} allow",
        f"qubesbuilder.ProcessGithubCommand * {net} {env.build_vm} allow",
        # ssh to the allowed hosts only, through the net qube.
        *(
            f"local.ConnectSSH +{host} {env.build_vm} {net} allow"
            for host in infrastructure.ssh_hosts
        ),
    ]


def admin_targets(infrastructure: Infrastructure) -> list[str]:
    """Where an admin qube runs Ansible: every qube the site configures. The build, keys and
    logs qubes by their tag; the templates and the net qube by name (they are not tagged: the
    final denial of the tagged qubes would close them to every other caller, the net qube's
    and the templates' own Qubes services included)."""
    return [f"@tag:{INFRA_TAG}", *infrastructure.templates, infrastructure.netvm]


def shared_policy_rules(
    infrastructure: Infrastructure, admin_qubes: tuple[str, ...] = ()
) -> list[str]:
    """The section of every environment: the admin qubes, then the denial of everything else.

    The build, keys and logs qubes carry the INFRA_TAG, so that one rule closes them to any call
    not allowed above it; dom0 (the Ansible controller by default) is not subject to policy.
    `admin_qubes` are names validate_admin_qubes accepted.
    """
    rules = [SHARED_SECTION]
    targets = list(dict.fromkeys(admin_targets(infrastructure)))
    for admin in admin_qubes:
        for target in targets:
            # Qubes 4.2 runs qubes.VMRootShell as the rule's user (4.3 forces root): name root.
            rules += [
                f"qubes.VMShell * {admin} {target} allow",
                f"qubes.VMRootShell * {admin} {target} allow user=root",
            ]
    for service in INFRA_SERVICES:
        rules += [f"{service} * @anyvm @anyvm deny", f"{service} * @anyvm @adminvm deny"]
    rules.append(f"* * @anyvm @tag:{INFRA_TAG} deny")
    return rules


def policy_rules(infrastructure: Infrastructure, admin_qubes: Sequence[str] = ()) -> list[str]:
    """Every flow of the infrastructure, one section per environment, then denials for
    everything else among its qubes."""
    admins = validate_admin_qubes(infrastructure, admin_qubes)
    rules = []
    for env in infrastructure.envs:
        rules += env_policy_rules(infrastructure, env)
    return rules + shared_policy_rules(infrastructure, admins)


def policy_sections(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """An installed policy file split into its environments' sections and the shared one.

    Comments before the first section (the file's header) belong to none; a rule there means the
    file was not written in sections, and its environments cannot be told apart.
    """
    envs: dict[str, list[str]] = {}
    shared: list[str] = []
    section: list[str] | None = None
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        match = _SECTION.match(line)
        if match:
            section = envs.setdefault(match["env"], []) if match["env"] else shared
        elif section is None and not line.startswith("#"):
            raise PolicyFileError(
                f"the installed policy has the rule {line!r} outside any environment's section"
                " (a file from an earlier version): apply it once without --limit"
            )
        if section is not None:
            section.append(line)
    return envs, shared


def limited_policy_rules(
    infrastructure: Infrastructure,
    envs: Collection[str],
    installed: str,
    admin_qubes: Sequence[str] = (),
) -> list[str]:
    """The policy of a run limited to `envs`: their sections as described now, every other
    section (environments and shared rules) exactly as installed. The admin qubes are validated
    even when the installed shared section is kept."""
    admins = validate_admin_qubes(infrastructure, admin_qubes)
    installed_envs, installed_shared = policy_sections(installed)
    described = {env.name: env for env in infrastructure.envs if env.name in envs}
    rules = []
    for name in sorted(set(installed_envs) | set(described)):
        if name in described:
            rules += env_policy_rules(infrastructure, described[name])
        else:
            rules += installed_envs[name]
    return rules + (installed_shared or shared_policy_rules(infrastructure, admins))


def expected_flows(infrastructure: Infrastructure) -> dict[tuple[str, str, str], str]:
    """(source, requested target, SERVICE[+ARG]) -> the qube the call runs in, for every call the
    infrastructure needs (the rows of DESIGN.md's diagram)."""
    flows: dict[tuple[str, str, str], str] = {}
    for env in infrastructure.envs:
        build, keys = env.build_vm, env.keys_vm
        flows[(build, "dom0", "qubesbuilder.BuildLog")] = env.logs
        flows[(env.logs, "dom0", f"qubesbuilder.LogReceived+{build}")] = keys
        flows[(build, keys, "qubes.Gpg")] = keys
        flows[(build, "@default", "qubes.Gpg")] = keys
        flows[(infrastructure.netvm, build, "qubesbuilder.TriggerBuild+component")] = build
        flows[(infrastructure.netvm, build, "qubesbuilder.ProcessGithubCommand")] = build
        for host in infrastructure.ssh_hosts:
            flows[(build, infrastructure.netvm, f"local.ConnectSSH+{host}")] = infrastructure.netvm
    return flows


def flow_matrix(infrastructure: Infrastructure) -> list[dict[str, str]]:
    """Every call among the infrastructure's qubes worth checking, with what policy must decide:
    `expect` is the qube it must run in, or empty when it must be refused."""
    qubes = [*infrastructure.qubes(), infrastructure.netvm]
    services = sorted({flow[2] for flow in expected_flows(infrastructure)})
    services += [
        f"qubesbuilder.LogReceived+{qube}" for qube in qubes if not qube.startswith("build-")
    ]
    services += ["local.ConnectSSH+example.invalid", "qubes.Filecopy", "qubes.VMShell"]
    expected = expected_flows(infrastructure)
    return [
        {
            "source": source,
            "target": target,
            "service": service,
            "expect": expected.get((source, target, service), ""),
        }
        for source in qubes
        for target in ["dom0", "@default", *qubes]
        if target != source
        for service in services
    ]
