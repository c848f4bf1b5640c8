"""What a host's release decides, where it is pure logic: the release asked for and kept, the
templates' files, dom0's default policy, qube name patterns."""

from __future__ import annotations

from pathlib import Path

import pytest

from qubesim import host, release, template
from qubesim.errors import NoSuchQube, QubesimError
from qubesim.model import State, initial_state
from qubesim.policy import engine
from qubesim.tools.common import qube_names

VMROOTSHELL_CONFIG = "etc/qubes/rpc-config/qubes.VMRootShell"
SUDOERS = "etc/sudoers.d/qubes"


# -- the release ---------------------------------------------------------------------------------
def test_the_release_asked_for_is_the_option_then_the_variable() -> None:
    assert release.requested("4.2", {"QUBESIM_RELEASE": "4.3"}) == "4.2"
    assert release.requested(None, {"QUBESIM_RELEASE": "4.2"}) == "4.2"
    assert release.requested(None, {"QUBESIM_RELEASE": ""}) is None
    assert release.requested(None, {}) is None


def test_a_release_that_is_not_simulated_is_refused_naming_where_it_came_from() -> None:
    with pytest.raises(QubesimError, match=r"QUBESIM_RELEASE: Qubes release '4.1' is not"):
        release.requested(None, {"QUBESIM_RELEASE": "4.1"})
    with pytest.raises(QubesimError, match=r"--release: Qubes release '5' is not simulated"):
        release.requested("5", {})


def test_a_host_keeps_its_release_and_one_without_a_record_is_4_3() -> None:
    state = State(initial_state())
    assert state.release == "4.3"  # made before qubesim recorded releases: it was made as 4.3
    state.data["release"] = "4.2"
    assert state.release == "4.2"
    home = "/var/lib/qubesim"
    assert release.chosen(home, None, None) == release.CURRENT == "4.3"  # a new host
    assert release.chosen(home, None, "4.2") == "4.2"
    assert release.chosen(home, "4.2", None) == "4.2"  # nothing asked: the host's own
    assert release.chosen(home, "4.2", "4.2") == "4.2"
    with pytest.raises(release.ReleaseMismatch) as refused:
        release.chosen(home, "4.2", "4.3")
    message = str(refused.value)
    assert "is Qubes 4.2, not 4.3" in message
    assert "qubesim destroy" in message
    assert home in message


def test_since_compares_releases_as_numbers() -> None:
    assert release.since("4.3", "4.3")
    assert release.since("4.10", "4.3")
    assert not release.since("4.2", "4.3")


# -- the templates' files ------------------------------------------------------------------------
def test_qubes_vmrootshell_is_forced_to_root_from_4_3() -> None:
    # qubes-core-agent-linux qubes-rpc/qubes.VMRootShell.config, on release4.3 (commit 1c538af2)
    assert VMROOTSHELL_CONFIG in template.guest_files("4.3", minimal=False)
    assert VMROOTSHELL_CONFIG in template.guest_files("4.3", minimal=True)
    assert VMROOTSHELL_CONFIG not in template.guest_files("4.2", minimal=False)
    for qubes_release in release.RELEASES:
        assert "etc/qubes-rpc/qubes.VMRootShell" in template.guest_files(qubes_release, True)


def test_a_minimal_template_goes_without_passwordless_root_and_keeps_the_rest() -> None:
    # qubes-core-agent-linux debian/qubes-core-agent-passwordless-root.install
    for qubes_release in release.RELEASES:
        full = template.guest_files(qubes_release, minimal=False)
        minimal = template.guest_files(qubes_release, minimal=True)
        assert SUDOERS in full and SUDOERS not in minimal
        assert set(full) - set(minimal) == {SUDOERS}
    assert template.PASSWORDLESS_ROOT in template.qubes_packages(minimal=False)
    assert template.PASSWORDLESS_ROOT not in template.qubes_packages(minimal=True)
    assert "qubes-gpg-split" in template.qubes_packages(minimal=True)


def test_the_minimal_template_is_named_as_qubes_names_them() -> None:
    assert template.minimal_template_name("debian-12") == "debian-12-minimal"


def test_user_leaves_the_groups_that_sudo_lets_administer(tmp_path: Path) -> None:
    group = tmp_path / "group"
    group.write_text("root:x:0:\nsudo:x:27:user,admin2\nwheel:x:10:user\nqubes:x:98:user\n")
    template._leave_admin_groups(group)
    assert group.read_text() == "root:x:0:\nsudo:x:27:admin2\nwheel:x:10:\nqubes:x:98:user\n"


def test_packages_are_registered_with_dpkg_as_chosen(tmp_path: Path) -> None:
    status = tmp_path / template.DPKG_STATUS
    (tmp_path / "var/lib/dpkg/info").mkdir(parents=True)
    status.write_text("Package: bash\nStatus: install ok installed\n\n")
    template._register_packages(tmp_path, template.qubes_packages(minimal=True))
    template._register_packages(tmp_path, template.qubes_packages(minimal=True))  # once
    packages = [
        line.removeprefix("Package: ")
        for line in status.read_text().splitlines()
        if line.startswith("Package: ")
    ]
    assert packages == ["bash", "qubes-gpg-split"]
    listed = tmp_path / "var/lib/dpkg/info/qubes-gpg-split.list"
    assert "/usr/bin/qubes-gpg-client\n" in listed.read_text()


# -- dom0's default policy -----------------------------------------------------------------------
@pytest.fixture(params=release.RELEASES)
def installed(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, object]:
    """A policy.d holding a release's default files, loaded by qubesim's policy engine."""
    policy_d = tmp_path / "policy.d"
    for relative, content in host.default_policy_files(request.param).items():
        (policy_d / relative).parent.mkdir(parents=True, exist_ok=True)
        (policy_d / relative).write_bytes(content)
    policy = engine().Policy.load([str(policy_d)], str(tmp_path / "no-legacy-policy"))
    return request.param, policy


SYSTEM_QUBES = [
    ("dom0", "AdminVM", ()),
    ("debian-12", "TemplateVM", ()),
    ("whonix-gw-17", "TemplateVM", ("whonix-updatevm",)),
    ("sys-net", "AppVM", ()),
    ("sys-whonix", "AppVM", ()),
    ("work", "AppVM", ()),
    ("anon", "AppVM", ("anon-vm",)),
]


def decide(policy: object, source: str, target: str, service: str) -> object:
    qube = engine().Qube
    qubes = [qube(name, klass, frozenset(tags)) for name, klass, tags in SYSTEM_QUBES]
    qubes.append(qube("default-dvm", "AppVM", template_for_dispvms=True))
    qubes.append(qube("with-dvm", "AppVM", default_dispvm="default-dvm"))
    name, _, argument = service.partition("+")
    return policy.evaluate(engine().Request(source, target, name, argument), engine().System(qubes))


def test_the_default_policy_files_are_upstream_s_and_lint_clean() -> None:
    # qubes-core-admin rpm_spec/core-dom0.spec.in and qubes-core-qrexec's Makefile: what a
    # default dom0 has in /etc/qubes/policy.d
    common = {
        "35-compat.policy",
        "85-admin-backup-restore.policy",
        "90-admin-policy-default.policy",
        "90-default.policy",
        "include/admin-policy-ro",
        "include/admin-policy-rwx",
    }
    assert set(host.default_policy_files("4.2")) == common
    assert set(host.default_policy_files("4.3")) == common | {"91-admin-default-deny.policy"}


@pytest.mark.parametrize(
    ("source", "target", "service", "allowed_to"),
    [
        # qubes-core-admin qubes-rpc-policy/90-default.policy
        ("work", "sys-net", "qubes.VMShell", None),
        ("work", "sys-net", "qubes.VMRootShell", None),
        ("with-dvm", "@dispvm", "qubes.VMShell", "@dispvm:default-dvm"),
        ("work", "sys-net", "qubes.VMExec+ls", None),
        ("work", "sys-net", "qubes.ConnectTCP+22", None),
        ("work", "sys-net", "qubes.Filecopy", None),  # ask: nobody answers
        ("work", "", "qubes.GetDate", "dom0"),
        ("anon", "", "qubes.GetDate", None),
        ("work", "dom0", "qubes.FeaturesRequest", "dom0"),
        ("debian-12", "", "qubes.UpdatesProxy", "sys-net"),
        ("whonix-gw-17", "", "qubes.UpdatesProxy", "sys-whonix"),
        ("whonix-gw-17", "sys-net", "qubes.UpdatesProxy", None),
        ("work", "", "qubes.UpdatesProxy", None),
        ("work", "dom0", "policy.RegisterArgument+x", None),
        # split-GPG ships no default policy from 4.2 (qubes-app-linux-split-gpg commit 612fcb0)
        ("work", "sys-net", "qubes.Gpg", None),
        # qubes-core-qrexec policy.d/90-admin-policy-default.policy: nobody, by default
        ("work", "dom0", "policy.List", None),
        # 85-admin-backup-restore.policy: only a management qube tagged for it
        ("work", "dom0", "admin.vm.List", None),
    ],
)
def test_the_default_policy_decides_the_same_on_both_releases(
    installed: tuple[str, object], source: str, target: str, service: str, allowed_to: str | None
) -> None:
    _release, policy = installed
    decision = decide(policy, source, target, service)
    assert (decision.target if decision.allowed else None) == allowed_to, decision.reason


def test_what_came_with_4_3_in_the_default_policy(installed: tuple[str, object]) -> None:
    qubes_release, policy = installed
    newer = qubes_release == "4.3"
    notifications = decide(policy, "work", "", "qubes.Notifications")
    assert (notifications.target if notifications.allowed else None) == ("dom0" if newer else None)
    get_all = decide(policy, "work", "dom0", "admin.vm.property.GetAll")
    assert not get_all.allowed
    if newer:  # 91-admin-default-deny.policy, quietly
        assert get_all.rule_location.split("/")[-1].startswith("91-admin-default-deny.policy:")
        assert not get_all.notify
    else:
        assert get_all.reason == "no matching rule found"


def test_the_releases_default_rules_differ_only_where_upstream_s_do() -> None:
    def rules(qubes_release: str) -> list[tuple[str, ...]]:
        return [
            tuple(line.split())
            for name, content in sorted(host.default_policy_files(qubes_release).items())
            for line in content.decode().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]

    older, newer = rules("4.2"), rules("4.3")
    added = [rule for rule in newer if rule not in older]
    assert [rule for rule in older if rule not in newer] == []
    assert [rule[:2] for rule in added] == [
        ("qubes.Notifications", "*"),
        ("admin.vm.property.GetAll", "*"),
        ("admin.vm.property.GetAll", "*"),
        ("admin.property.GetAll", "*"),
        ("admin.property.GetAll", "*"),
    ]


# -- qube name patterns --------------------------------------------------------------------------
def host_of(qubes_release: str) -> State:
    state = State(initial_state())
    state.data["release"] = qubes_release
    for name in ("build-a", "build-b", "keys-a"):
        state.add_qube(name, "StandaloneVM", "red", None)
    return state


def test_names_are_patterns_from_4_3() -> None:
    # qubesadmin/tools/__init__.py VmNameAction.parse_qubes_app (release4.3)
    state = host_of("4.3")
    assert qube_names(state, ["build-*"]) == ["build-a", "build-b"]
    assert qube_names(state, ["keys-a", "*-a", "keys-a"]) == ["keys-a", "build-a"]
    assert qube_names(state, ["d?m0"]) == ["dom0"]
    assert qube_names(state, ["nothing-*"]) == []
    with pytest.raises(NoSuchQube):
        qube_names(state, ["nothing"])


def test_names_are_names_on_4_2() -> None:
    state = host_of("4.2")
    assert qube_names(state, ["keys-a", "keys-a"]) == ["keys-a", "keys-a"]
    with pytest.raises(NoSuchQube):
        qube_names(state, ["build-*"])
