# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The dom0 qrexec policy of the build infrastructure, and the matrix of calls verify.yml checks.

Both are made from one list of flows (the arrows of DESIGN.md's diagram): every allow rule of the
policy is a flow, and the matrix expects exactly the environments' flows to be allowed, so that
the policy the dom0 role installs and what verify.yml checks cannot disagree. Controller only:
the roles' filters make the policy lines, and the qrexec_policy module writes them.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_envs import (
    ConfigError,
    Env,
    Infrastructure,
    qube_name,
)

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

ADMIN_QUBES = "dom0_admin_qubes"


class PolicyFileError(ValueError):
    """An installed policy file this collection cannot split into its sections."""


@dataclass(frozen=True)
class Flow:
    """One call dom0 allows: `service` from `source` to the `target` it asks for, run in
    `redirect` instead when that is set, as `user` when that is set (else the target's default).

    `argument` is the one argument allowed, or None for any; the flow matrix makes the call with
    it, or with `example` when any is allowed.
    """

    service: str
    source: str
    target: str
    redirect: str | None = None
    argument: str | None = None
    example: str = ""
    user: str | None = None

    @property
    def runs_in(self) -> str:
        """The qube the call runs in."""
        return self.redirect or self.target

    @property
    def rule(self) -> str:
        """The flow as a line of a v5 policy file."""
        argument = "*" if self.argument is None else f"+{self.argument}"
        options = "".join(
            f" {name}={value}"
            for name, value in (("target", self.redirect), ("user", self.user))
            if value
        )
        return f"{self.service} {argument} {self.source} {self.target} allow{options}"

    @property
    def call(self) -> str:
        """SERVICE[+ARGUMENT], as the flow matrix makes the call."""
        argument = self.example if self.argument is None else self.argument
        return f"{self.service}+{argument}" if argument else self.service


def env_flows(infrastructure: Infrastructure, env: Env) -> list[Flow]:
    """The flows of one environment (DESIGN.md), in the order of its policy section."""
    build, keys, net = env.build_vm, env.keys_vm, infrastructure.netvm
    return [
        # Build logs go to the logs qube; its receipt opens the signing window in keys-ENV.
        Flow("qubesbuilder.BuildLog", build, "dom0", redirect=env.logs),
        Flow("qubesbuilder.LogReceived", env.logs, "dom0", redirect=keys, argument=build),
        # Split-GPG: the build qube signs with its own keys qube only.
        Flow("qubes.Gpg", build, keys),
        Flow("qubes.Gpg", build, "@default", redirect=keys),
        # Webhooks received in the net qube start builds (of a component, named as argument).
        Flow("qubesbuilder.TriggerBuild", net, build, example="component"),
        Flow("qubesbuilder.ProcessGithubCommand", net, build),
        # ssh to the allowed hosts only, through the net qube.
        *(Flow("local.ConnectSSH", build, net, argument=host) for host in infrastructure.ssh_hosts),
    ]


def admin_targets(infrastructure: Infrastructure) -> list[str]:
    """Where an admin qube runs Ansible: every qube the site configures. The build, keys and
    logs qubes by their tag; the templates and the net qube by name (they are not tagged: the
    final denial of the tagged qubes would close them to every other caller, the net qube's
    and the templates' own Qubes services included)."""
    return [f"@tag:{INFRA_TAG}", *infrastructure.templates, infrastructure.netvm]


def admin_flows(infrastructure: Infrastructure, admin_qubes: tuple[str, ...]) -> list[Flow]:
    """The shells of the admin qubes (names validate_admin_qubes accepted) in every qube the
    site configures."""
    targets = list(dict.fromkeys(admin_targets(infrastructure)))
    return [
        flow
        for admin in admin_qubes
        for target in targets
        for flow in (
            Flow("qubes.VMShell", admin, target),
            # Qubes 4.2 runs qubes.VMRootShell as the rule's user (4.3 forces root): name root.
            Flow("qubes.VMRootShell", admin, target, user="root"),
        )
    ]


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
    """The section of one environment: each of its flows, and no other."""
    return [
        ENV_SECTION.format(name=env.name),
        *(flow.rule for flow in env_flows(infrastructure, env)),
    ]


def shared_policy_rules(
    infrastructure: Infrastructure, admin_qubes: tuple[str, ...] = ()
) -> list[str]:
    """The section of every environment: the admin qubes, then the denial of everything else.

    The build, keys and logs qubes carry the INFRA_TAG, so that one rule closes them to any call
    not allowed above it; dom0 (the Ansible controller by default) is not subject to policy.
    `admin_qubes` are names validate_admin_qubes accepted.
    """
    rules = [SHARED_SECTION, *(flow.rule for flow in admin_flows(infrastructure, admin_qubes))]
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
    environments need: the flows of their policy sections."""
    return {
        (flow.source, flow.target, flow.call): flow.runs_in
        for env in infrastructure.envs
        for flow in env_flows(infrastructure, env)
    }


def flow_matrix(infrastructure: Infrastructure) -> list[dict[str, str]]:
    """Every call among the infrastructure's qubes worth checking, with what policy must decide:
    `expect` is the qube it must run in, or empty when it must be refused."""
    qubes = [*infrastructure.qubes(), infrastructure.netvm]
    expected = expected_flows(infrastructure)
    services = sorted({service for _source, _target, service in expected})
    services += [
        f"qubesbuilder.LogReceived+{qube}" for qube in qubes if not qube.startswith("build-")
    ]
    services += ["local.ConnectSSH+example.invalid", "qubes.Filecopy", "qubes.VMShell"]
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
