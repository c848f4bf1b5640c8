"""The dom0 policy and the flow matrix of the build environments: the policy, evaluated by the
policy engine, decides every call of the matrix; a limited run rewrites only its environments'
sections; the admin qubes reach what the site configures, and nothing that is not an admin qube
of its own is taken as one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ansible_collections.qubes_infra.build.plugins.module_utils.qrexec_policy import (
    Policy,
    Qube,
    Request,
    System,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.build_envs import ConfigError, load
from ansible_collections.qubes_infra.build.plugins.plugin_utils.dom0_policy import (
    INFRA_TAG,
    SHARED_SECTION,
    PolicyFileError,
    flow_matrix,
    limited_policy_rules,
    policy_rules,
    validate_admin_qubes,
)

from tests.unit.plugin_utils.test_build_envs import EXAMPLE


def test_policy_rules_load_and_decide_the_matrix() -> None:
    """The generated policy, evaluated by the engine, gives every verdict of the flow matrix."""

    infrastructure = load(EXAMPLE)
    tagged = frozenset({INFRA_TAG})
    system = System(
        [Qube("dom0", "AdminVM"), Qube("sys-net", "AppVM")]
        + [Qube(name, "AppVM", tags=tagged) for name in infrastructure.qubes()]
    )
    policy = Policy.from_text("\n".join(policy_rules(infrastructure)) + "\n", "20-test.policy")
    matrix = flow_matrix(infrastructure)
    assert sum(1 for flow in matrix if flow["expect"]) == 2 * 8  # two envs, eight flows each
    for flow in matrix:
        service, _sep, argument = flow["service"].partition("+")
        decision = policy.evaluate(
            Request(flow["source"], flow["target"], service, argument), system
        )
        assert (decision.target if decision.allowed else "") == flow["expect"], flow


def _policy_file(rules: list[str]) -> str:
    """A policy file as the qrexec_policy module writes it: its header, then the rules."""
    return "# Managed by Ansible (qubes_infra.build).\n" + "\n".join(rules) + "\n"


def _section(rules: list[str], env: str) -> list[str]:
    start = rules.index(f"# Environment {env}: build logs, signing, webhooks and ssh of its qubes.")
    end = next(i for i in range(start + 1, len(rules)) if rules[i].startswith("# "))
    return rules[start:end]


def test_a_limited_policy_changes_only_its_environments_sections() -> None:

    installed = policy_rules(load(EXAMPLE), ("mgmt",))
    changed = load({**EXAMPLE, "build_infra_remote_hosts": {}, "build_infra_netvm": "sys-other"})
    rules = limited_policy_rules(changed, {"kernel"}, _policy_file(installed))
    assert _section(rules, "fedora") == _section(installed, "fedora")
    assert _section(rules, "kernel") == _section(policy_rules(changed), "kernel")
    assert "qubesbuilder.TriggerBuild * sys-other build-kernel allow" in rules
    # the admin qubes' lines are shared: kept as installed though not given again
    assert "qubes.VMShell * mgmt @tag:qubes-infra-build allow" in rules
    # Qubes 4.2's agent has no rpc-config forcing root for qubes.VMRootShell (core-agent-linux
    # qubes-rpc/qubes.VMRootShell.config comes with 4.3): the rule asks for root itself
    assert "qubes.VMRootShell * mgmt @tag:qubes-infra-build allow user=root" in rules
    assert rules[-1] == "* * @anyvm @tag:qubes-infra-build deny"
    # the same description again changes nothing
    assert limited_policy_rules(changed, {"kernel"}, _policy_file(rules)) == rules


def test_a_limited_policy_keeps_an_environment_no_longer_described() -> None:

    installed = policy_rules(load(EXAMPLE))
    without_kernel = {
        **EXAMPLE,
        "build_infra_envs": {"fedora": EXAMPLE["build_infra_envs"]["fedora"]},
    }
    assert (
        limited_policy_rules(load(without_kernel), {"fedora"}, _policy_file(installed)) == installed
    )


def test_a_limited_policy_on_a_host_without_one_has_only_its_environments() -> None:

    rules = limited_policy_rules(load(EXAMPLE), {"fedora"}, "")
    assert not any("build-kernel" in rule for rule in rules)
    assert "qubes.Gpg * build-fedora keys-fedora allow" in rules
    assert rules[-1] == "* * @anyvm @tag:qubes-infra-build deny"


def test_a_policy_file_without_sections_is_refused_under_a_limit() -> None:

    earlier = "# Managed by Ansible\nqubes.Gpg * build-kernel keys-kernel allow\n"
    with pytest.raises(PolicyFileError) as error:
        limited_policy_rules(load(EXAMPLE), {"fedora"}, earlier)
    assert "'qubes.Gpg * build-kernel keys-kernel allow'" in str(error.value)
    assert "without --limit" in str(error.value)


# -- admin qubes (dom0_admin_qubes) ---------------------------------------------------------------
# The example with a net template, so that every kind of qube the site configures is there.
WITH_NET_TEMPLATE: dict[str, Any] = {**EXAMPLE, "build_infra_net_template": "debian-12"}
POLICY_FILE = "20-qubes-infra-build.policy"  # the dom0 role's dom0_policy_file


def _admin_rules(admin: str, target: str) -> list[str]:
    return [
        f"qubes.VMShell * {admin} {target} allow",
        f"qubes.VMRootShell * {admin} {target} allow user=root",
    ]


def test_admin_qubes_reach_every_qube_the_site_configures() -> None:
    """The tagged qubes, each template of the infrastructure and the net qube, with both
    services; VMRootShell names root (Qubes 4.2 has no rpc-config forcing it)."""

    rules = policy_rules(load(WITH_NET_TEMPLATE), ["mgmt", "ansible-2"])
    shared = rules[rules.index(SHARED_SECTION) :]
    for admin in ("mgmt", "ansible-2"):
        for target in (
            "@tag:qubes-infra-build",
            "fedora-43-xfce",  # build and logs template
            "fedora-43-minimal",  # keys template
            "debian-12",  # net template
            "sys-net",
        ):
            for rule in _admin_rules(admin, target):
                assert shared.count(rule) == 1, rule
    # Before every denial of the shared section, which they must not come after.
    last_admin = max(i for i, rule in enumerate(shared) if rule.startswith("qubes.VM"))
    first_denial = min(i for i, rule in enumerate(shared) if rule.endswith(" deny"))
    assert last_admin < first_denial
    # Nothing for the netvms of the build and logs qubes: the site does not configure them.
    assert not any("sys-whonix" in rule or "sys-firewall" in rule for rule in shared)
    # Without a net template, no rule names one.
    assert _admin_rules("mgmt", "debian-12")[0] not in policy_rules(load(EXAMPLE), ["mgmt"])


def test_without_admin_qubes_the_shared_section_allows_nothing() -> None:

    assert not any(" allow" in rule and "qubes.VM" in rule for rule in policy_rules(load(EXAMPLE)))


@pytest.mark.parametrize(
    "name", ["mgmt", "admin_1", "Ansible-Controller", "a", "m" * 31, "sys-net-admin"]
)
def test_admin_qube_names_are_accepted(name: str) -> None:

    assert validate_admin_qubes(load(WITH_NET_TEMPLATE), [name]) == (name,)


def test_an_admin_qube_named_twice_gets_its_rules_once() -> None:

    infrastructure = load(EXAMPLE)
    assert validate_admin_qubes(infrastructure, ["mgmt", "other", "mgmt"]) == ("mgmt", "other")
    assert policy_rules(infrastructure, ["mgmt", "mgmt"]) == policy_rules(infrastructure, ["mgmt"])


NOT_A_QUBE_NAME = "is not a qube name: policy keywords (@anyvm, @tag:..., @type:..., @adminvm"
OF_ITS_OWN = "; an admin qube must be a qube of its own"


@pytest.mark.parametrize(
    ("admins", "message"),
    [
        # policy keywords: they stand for other qubes too
        *(
            ([token], f"dom0_admin_qubes: {token!r} {NOT_A_QUBE_NAME}")
            for token in (
                "@anyvm",
                "@tag:qubes-infra-build",
                "@tag:admins",
                "@type:AppVM",
                "@adminvm",
                "@dispvm",
                "@dispvm:default-dvm",
                "@default",
            )
        ),
        # dom0
        (["dom0"], "dom0_admin_qubes: 'dom0' is not a qube to name here"),
        # the infrastructure's own qubes
        (
            ["sys-net"],
            f"dom0_admin_qubes: 'sys-net' is the net qube of the infrastructure{OF_ITS_OWN}",
        ),
        (["build-fedora"], f"'build-fedora' is the build qube of env 'fedora'{OF_ITS_OWN}"),
        (["keys-kernel"], f"'keys-kernel' is the keys qube of env 'kernel'{OF_ITS_OWN}"),
        (["build-logs"], f"'build-logs' is a logs qube of the infrastructure{OF_ITS_OWN}"),
        (["logs-kernel"], f"'logs-kernel' is a logs qube of the infrastructure{OF_ITS_OWN}"),
        (
            ["fedora-43-xfce"],
            f"'fedora-43-xfce' is the build and logs template of the infrastructure{OF_ITS_OWN}",
        ),
        (
            ["fedora-43-minimal"],
            f"'fedora-43-minimal' is the keys template of the infrastructure{OF_ITS_OWN}",
        ),
        (["debian-12"], f"'debian-12' is the net template of the infrastructure{OF_ITS_OWN}"),
        # not qube names at all, in the data model's own words
        (["mgmt", "*"], "dom0_admin_qubes: qube name '*' must match ^[a-zA-Z][a-zA-Z0-9_-]*$"),
        (["my admin"], "dom0_admin_qubes: qube name 'my admin' must match"),
        (["mgmt.vm"], "dom0_admin_qubes: qube name 'mgmt.vm' must match"),
        (["uuid:1234"], "dom0_admin_qubes: qube name 'uuid:1234' must match"),
        (["m" * 32], f"dom0_admin_qubes: qube name {'m' * 32!r} is longer than 31 characters"),
        ([""], "dom0_admin_qubes: a qube name is required"),
        ([None], "dom0_admin_qubes: a qube name is required"),
        ("mgmt", "dom0_admin_qubes: must be a list of qube names, not 'mgmt'"),
    ],
)
def test_admin_qubes_that_are_not_an_admin_qube_of_their_own_are_refused(
    admins: object, message: str
) -> None:

    infrastructure = load(WITH_NET_TEMPLATE)
    with pytest.raises(ConfigError) as error:
        validate_admin_qubes(infrastructure, admins)
    assert message in str(error.value)
    # The policy is never made with them, even when a limited run keeps the installed shared
    # section (where they would not go).
    with pytest.raises(ConfigError, match=r"^dom0_admin_qubes: "):
        policy_rules(infrastructure, admins)  # type: ignore[arg-type]
    installed = _policy_file(policy_rules(infrastructure))
    with pytest.raises(ConfigError, match=r"^dom0_admin_qubes: "):
        limited_policy_rules(infrastructure, {"kernel"}, installed, admins)  # type: ignore[arg-type]


def test_the_dom0_role_s_filter_refuses_them_as_an_ansible_error() -> None:
    """The dom0 role makes its policy with the build_infra_policy filter before it changes
    anything; preflight checks with build_infra_admin_qubes. Both fail with the model's words."""
    from ansible.errors import AnsibleFilterError
    from ansible_collections.qubes_infra.build.plugins.filter.build_infra import (
        build_infra_admin_qubes,
        build_infra_policy,
    )

    message = "dom0_admin_qubes: 'sys-net' is the net qube of the infrastructure" + OF_ITS_OWN
    for call in (
        lambda: build_infra_policy(EXAMPLE, ["mgmt", "sys-net"]),
        lambda: build_infra_policy(EXAMPLE, ["sys-net"], ["fedora"], ""),
        lambda: build_infra_admin_qubes(EXAMPLE, ["sys-net"]),
        lambda: build_infra_admin_qubes(EXAMPLE, "mgmt,sys-net"),  # as Ansible's list type
    ):
        with pytest.raises(AnsibleFilterError) as error:
            call()
        assert message in str(error.value)
    with pytest.raises(AnsibleFilterError, match="'@anyvm' is not a qube name"):
        build_infra_policy(EXAMPLE, ["@anyvm"])
    with pytest.raises(AnsibleFilterError, match="must be a list of qube names, not"):
        build_infra_admin_qubes(EXAMPLE, {"mgmt": True})  # type: ignore[arg-type]
    assert build_infra_admin_qubes(EXAMPLE, "mgmt,other") == ["mgmt", "other"]
    assert build_infra_admin_qubes(EXAMPLE, None) == []  # type: ignore[arg-type]


@pytest.mark.parametrize("qubes_release", ["4.2", "4.3"])
def test_admin_qubes_under_each_release_s_default_policy(
    tmp_path: Path, qubes_release: str
) -> None:
    """Our policy file, as the dom0 role installs it, with the release's default policy files
    after it: an admin qube's qubes.VMShell and qubes.VMRootShell (as root) reach the templates,
    the net qube and the tagged qubes, by our rules; no qube outside the infrastructure, and
    none of its qubes for another caller."""
    from ansible_collections.qubes_infra.build.plugins.modules.qrexec_policy import (
        DEFAULT_HEADER,
        render,
    )

    from qubesim import host

    infrastructure = load(WITH_NET_TEMPLATE)
    policy_d = tmp_path / "policy.d"
    for relative, content in host.default_policy_files(qubes_release).items():
        (policy_d / relative).parent.mkdir(parents=True, exist_ok=True)
        (policy_d / relative).write_bytes(content)
    assert (policy_d / "90-default.policy").is_file()
    (policy_d / POLICY_FILE).write_text(
        render(DEFAULT_HEADER, policy_rules(infrastructure, ["mgmt"]))
    )
    policy = Policy.load([str(policy_d)], str(tmp_path / "no-legacy-policy"))
    tagged = frozenset({INFRA_TAG})
    system = System(
        [
            Qube("dom0", "AdminVM"),
            Qube("mgmt", "AppVM"),
            Qube("work", "AppVM"),
            Qube("fedora-43-xfce", "TemplateVM"),
            Qube("fedora-43-minimal", "TemplateVM"),
            Qube("debian-12", "TemplateVM"),
            Qube("debian-12-other", "TemplateVM"),
            Qube("sys-net", "AppVM"),
            Qube("sys-firewall", "AppVM"),
            Qube("sys-whonix", "AppVM"),
            *(Qube(name, "AppVM", tags=tagged) for name in infrastructure.qubes()),
        ]
    )

    def decide(source: str, target: str, service: str) -> Any:
        return policy.evaluate(Request(source, target, service), system)

    reached = [
        "fedora-43-xfce",
        "fedora-43-minimal",
        "debian-12",
        "sys-net",
        *infrastructure.qubes(),
    ]
    for target in reached:
        shell = decide("mgmt", target, "qubes.VMShell")
        assert shell.allowed and shell.target == target, (target, shell.reason)
        assert shell.user is None  # the qube's default user
        root = decide("mgmt", target, "qubes.VMRootShell")
        assert root.allowed and root.target == target, (target, root.reason)
        assert root.user == "root", target
        for decision in (shell, root):
            assert decision.rule_location.startswith(f"{policy_d / POLICY_FILE}:"), decision.reason
    # Outside the infrastructure: not by our file; Qubes' default denies it.
    default = f"{policy_d / '90-default.policy'}:"
    for target in ("work", "debian-12-other", "sys-firewall", "sys-whonix", "@dispvm"):
        for service in ("qubes.VMShell", "qubes.VMRootShell"):
            decision = decide("mgmt", target, service)
            assert not decision.rule_location.startswith(f"{policy_d / POLICY_FILE}:"), (
                target,
                service,
                decision.reason,
            )
            if target != "@dispvm":
                assert not decision.allowed, (target, service, decision.reason)
                assert decision.rule_location.startswith(default), decision.reason
    # Another qube gets none of it: the tagged qubes by our denial, the rest by Qubes' default.
    for source in ("work", "sys-net"):
        for target in reached:
            if target == source:
                continue
            for service in ("qubes.VMShell", "qubes.VMRootShell"):
                assert not decide(source, target, service).allowed, (source, target, service)
