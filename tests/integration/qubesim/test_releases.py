"""The host is one Qubes release (4.3 or 4.2), and what differs between them follows it; the host
has the distribution's template and its minimal one, as a Qubes installation has them.

Each test asserts the behaviour of the release of the host it runs on (`qubesim info`), and names
where upstream states it: qubes-core-agent-linux (the qubes' side), qubes-core-admin-client
(qubesadmin/, dom0's tools), qubes-core-admin (qubesd, dom0's default policy), qubes-core-qrexec,
each on its release4.2 / release4.3 branch.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.conftest import (
    POLICY_DIR,
    Policy,
    Qvm,
    as_root,
    audit_since,
    host_info,
    host_release,
)

NewName = Callable[[], str]
RELEASES = ("4.2", "4.3")
FULL = "debian-12"
MINIMAL = "debian-12-minimal"
PREFS_NUMBERS = ("VCPUS", "INITIALMEM", "MAXMEM", "VIRT-MODE")


def newer() -> bool:
    """Whether the host is 4.3 (the current release), as against 4.2."""
    return host_release() == "4.3"


def root_shell(qvm: Qvm, qube: str, *options: str) -> str:
    """The uid that qubes.VMRootShell, called from dom0, runs `id -u` as."""
    shell = qvm(
        "qvm-run", "--pass-io", *options, "--service", qube, "qubes.VMRootShell", input="id -u\n"
    )
    return shell.stdout.strip()


# -- the host ------------------------------------------------------------------------------------
def test_info_names_the_release_the_home_and_both_templates() -> None:
    info = host_info()
    assert list(info) == ["release", "home", "templates", "default_template"]
    assert info["release"] in RELEASES
    assert Path(info["home"]).is_absolute()
    assert {FULL, MINIMAL} <= set(info["templates"].split())
    # dom0's defaults that name a template keep the full one
    assert info["default_template"] == FULL


def test_init_refuses_another_release_and_says_how_to_start_over() -> None:
    release = host_release()
    other = next(candidate for candidate in RELEASES if candidate != release)
    before = subprocess.run(["qubesim", "info"], capture_output=True, text=True, check=True)
    refused = subprocess.run(
        ["qubesim", "init", "--release", other], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1, refused
    assert f"is Qubes {release}, not {other}" in refused.stderr
    assert "qubesim destroy" in refused.stderr
    assert refused.stdout == ""
    after = subprocess.run(["qubesim", "info"], capture_output=True, text=True, check=True)
    assert after.stdout == before.stdout


# -- qubes.VMRootShell ---------------------------------------------------------------------------
def test_root_shell_from_dom0_is_root_from_4_3_and_the_default_user_on_4_2(
    qvm: Qvm, isolated_appvm: str
) -> None:
    # qubes-core-agent-linux qubes-rpc/qubes.VMRootShell.config (force-user='root'), installed in
    # /etc/qubes/rpc-config from release4.3 (commit 1c538af2), absent on release4.2;
    # qubes-core-admin-client qubesadmin/app.py QubesLocal.run_service: dom0 calls the service as
    # the DEFAULT user unless `qvm-run --user` names one (qubesadmin/tools/qvm_run.py).
    assert root_shell(qvm, isolated_appvm) == ("0" if newer() else "1000")
    assert root_shell(qvm, isolated_appvm, "--user", "root") == "0"
    assert as_root(isolated_appvm, "id -u").stdout == "0\n"
    rpc_config = qvm(
        "qvm-run",
        "--pass-io",
        isolated_appvm,
        "cat /etc/qubes/rpc-config/qubes.VMRootShell",
        check=False,
    )
    assert (rpc_config.returncode == 0) is newer()


def test_root_shell_from_a_qube_runs_as_the_policy_user_on_4_2(
    qvm: Qvm, policy: Policy, new_name: NewName
) -> None:
    # qubes-core-qrexec qrexec/policy/parser.py (user= of an allow rule, else the target's
    # default user) and, from 4.3, the agent's rpc-config forcing root (as above).
    source, target = new_name(), new_name()
    for name in (source, target):
        qvm("qvm-create", "--label", "red", "--property", "netvm=", name)
    policy(f"qubes.VMRootShell * {source} {target} allow")

    def uid() -> str:
        command = f"echo 'id -u' | qrexec-client-vm {target} qubes.VMRootShell"
        return qvm("qvm-run", "--pass-io", source, command).stdout.strip()

    assert uid() == ("0" if newer() else "1000")
    policy(f"qubes.VMRootShell * {source} {target} allow user=root")
    assert uid() == "0"


def test_qvm_run_as_root_takes_the_root_shell_from_4_3_when_the_template_has_it(
    qvm: Qvm, isolated_appvm: str
) -> None:
    # qubesadmin/tools/qvm_run.py run_command_single (release4.3): a command for root goes to
    # qubes.VMRootShell, as the default user, when the template says it has qubes.VMRootExec
    # (feature supported-rpc.qubes.VMRootExec, checked with the template); release4.2 always
    # runs qubes.VMShell as root.
    qvm("qvm-features", isolated_appvm, "supported-rpc.qubes.VMRootExec", "1")
    started = datetime.now(UTC)
    assert as_root(isolated_appvm, "id -u").stdout == "0\n"
    services = [entry["service"] for entry in audit_since(started)]
    assert services == ["qubes.VMRootShell" if newer() else "qubes.VMShell"]
    qvm("qvm-features", "--unset", isolated_appvm, "supported-rpc.qubes.VMRootExec")
    started = datetime.now(UTC)
    assert as_root(isolated_appvm, "id -u").stdout == "0\n"
    assert [entry["service"] for entry in audit_since(started)] == ["qubes.VMShell"]


# -- the minimal template ------------------------------------------------------------------------
@pytest.fixture
def minimal_template(qvm: Qvm) -> Iterator[str]:
    """The minimal template, halted again afterwards if the test started it."""
    was_running = qvm("qvm-check", "--running", "--quiet", MINIMAL, check=False).returncode == 0
    yield MINIMAL
    if not was_running:
        qvm("qvm-shutdown", "--wait", MINIMAL, check=False)


def sudo_as_user(qvm: Qvm, qube: str) -> subprocess.CompletedProcess[str]:
    return qvm("qvm-run", "--pass-io", qube, "sudo -n id -u", check=False)


def dpkg_status(qvm: Qvm, qube: str, package: str) -> str:
    query = f"dpkg-query -W -f='${{db:Status-Status}}' {package} 2>/dev/null || true"
    return qvm("qvm-run", "--pass-io", qube, query).stdout


def test_the_minimal_template_has_no_passwordless_root(
    qvm: Qvm, new_name: NewName, minimal_template: str
) -> None:
    # qubes-core-agent-linux debian/qubes-core-agent-passwordless-root.install: the package owns
    # /etc/sudoers.d/qubes (passwordless-root/qubes.sudoers); Qubes' minimal templates do not
    # carry it, and root is reached with `qvm-run -u root` (qubes-doc, minimal templates), or on
    # 4.3 with qubes.VMRootShell. The other Qubes packages stay (split-GPG's client).
    appvm = new_name()
    qvm("qvm-create", "--label", "red", "--template", minimal_template, "--prop", "netvm=", appvm)
    for qube in (minimal_template, appvm):
        refused = sudo_as_user(qvm, qube)
        assert refused.returncode == 1, refused
        assert "password is required" in refused.stderr
        assert as_root(qube, "id -u").stdout == "0\n"
        assert as_root(qube, "test -e /etc/sudoers.d/qubes", check=False).returncode == 1
        assert dpkg_status(qvm, qube, "qubes-core-agent-passwordless-root") != "installed"
        assert dpkg_status(qvm, qube, "qubes-gpg-split") == "installed"
        assert root_shell(qvm, qube) == ("0" if newer() else "1000")
    assert qvm("qvm-prefs", appvm, "template").stdout == f"{minimal_template}\n"


def test_the_full_template_keeps_passwordless_root(qvm: Qvm, isolated_appvm: str) -> None:
    # the same package, in the full template and so in the qubes based on it
    assert qvm("qvm-prefs", isolated_appvm, "template").stdout == f"{FULL}\n"
    assert sudo_as_user(qvm, isolated_appvm).stdout == "0\n"
    assert dpkg_status(qvm, isolated_appvm, "qubes-core-agent-passwordless-root") == "installed"


# -- dom0's default policy -----------------------------------------------------------------------
def just_evaluate(qvm: Qvm, source: str, target: str, service: str) -> bool:
    result = qvm("qrexec-policy-exec", "--just-evaluate", source, target, service, check=False)
    return result.returncode == 0


def test_dom0_has_the_default_policy_files_of_its_release() -> None:
    # qubes-core-admin rpm_spec/core-dom0.spec.in (/etc/qubes/policy.d: 85-admin-backup-restore,
    # 90-default, 91-admin-default-deny from 4.3) and qubes-core-qrexec Makefile (35-compat,
    # 90-admin-policy-default, include/admin-policy-ro and -rwx).
    names = {path.name for path in POLICY_DIR.glob("[0-9]*.policy")}
    default = {
        "35-compat.policy",
        "85-admin-backup-restore.policy",
        "90-admin-policy-default.policy",
        "90-default.policy",
    }
    assert default <= names
    assert ("91-admin-default-deny.policy" in names) is newer()
    assert {path.name for path in (POLICY_DIR / "include").iterdir()} >= {
        "admin-policy-ro",
        "admin-policy-rwx",
    }


def test_the_default_policy_decides_as_upstream_s(qvm: Qvm, isolated_appvm: str) -> None:
    # qubes-core-admin qubes-rpc-policy/90-default.policy, release4.2 and release4.3.
    other, template = "sys-firewall", FULL
    assert just_evaluate(qvm, isolated_appvm, "", "qubes.GetDate")
    assert just_evaluate(qvm, isolated_appvm, "dom0", "qubes.FeaturesRequest")
    assert not just_evaluate(qvm, isolated_appvm, other, "qubes.VMShell")
    assert not just_evaluate(qvm, isolated_appvm, other, "qubes.VMRootShell")
    assert not just_evaluate(qvm, isolated_appvm, other, "qubes.ConnectTCP+22")
    assert not just_evaluate(qvm, isolated_appvm, other, "qubes.Filecopy")  # ask: nobody answers
    assert just_evaluate(qvm, template, "", "qubes.UpdatesProxy")
    assert not just_evaluate(qvm, isolated_appvm, "", "qubes.UpdatesProxy")
    # split-GPG has no default rule from 4.2 (qubes-app-linux-split-gpg, commit 612fcb0)
    assert not just_evaluate(qvm, isolated_appvm, other, "qubes.Gpg")
    # qubes.Notifications to dom0 came with 4.3
    assert just_evaluate(qvm, isolated_appvm, "", "qubes.Notifications") is newer()


def test_a_whonix_template_updates_through_sys_whonix(qvm: Qvm, new_name: NewName) -> None:
    # 90-default.policy: templates tagged whonix-updatevm use sys-whonix's proxy and no other
    template = new_name()
    qvm("qvm-create", "--class", "TemplateVM", "--label", "black", template)
    qvm("qvm-tags", template, "add", "whonix-updatevm")
    allowed = qvm("qrexec-policy-exec", template, "", "qubes.UpdatesProxy")
    assert "target=sys-whonix" in allowed.stdout.splitlines()
    assert not just_evaluate(qvm, template, "sys-net", "qubes.UpdatesProxy")


def test_a_call_refused_by_default_names_the_default_rule(qvm: Qvm, new_name: NewName) -> None:
    # qubes-core-admin 91-admin-default-deny.policy (release4.3 only): reading every property of
    # a qube at once is refused by a rule; on 4.2 no rule matches.
    source, target = new_name(), new_name()
    for name in (source, target):
        qvm("qvm-create", "--label", "red", "--property", "netvm=", name)
    started = datetime.now(UTC)
    shell = qvm(
        "qvm-run", "--pass-io", source, f"qrexec-client-vm {target} qubes.VMShell", check=False
    )
    get_all = qvm(
        "qvm-run",
        "--pass-io",
        source,
        "qrexec-client-vm dom0 admin.vm.property.GetAll",
        check=False,
    )
    assert (shell.returncode, get_all.returncode) == (126, 126)
    entries = {
        entry["service"]: entry for entry in audit_since(started) if entry["source"] == source
    }
    default = POLICY_DIR / "90-default.policy"
    line = (
        default.read_text()
        .splitlines()
        .index("qubes.VMShell           *           @anyvm          @anyvm      deny")
    )
    assert entries["qubes.VMShell"]["rule"] == f"{default}:{line + 1}"
    get_all_rule = str(entries["admin.vm.property.GetAll"]["rule"])
    if newer():
        assert get_all_rule.startswith(f"{POLICY_DIR}/91-admin-default-deny.policy:")
    else:
        assert (get_all_rule, entries["admin.vm.property.GetAll"]["reason"]) == (
            "",
            "no matching rule found",
        )


# -- dom0's tools --------------------------------------------------------------------------------
def test_qvm_ls_has_the_options_of_its_release(qvm: Qvm) -> None:
    # qubesadmin/tools/qvm_ls.py: release4.3 adds to get_parser --class, --label, --exclude-tags,
    # --prefs, --sort, --reverse, --ignore-case, to `formats` the `prefs` format, and the columns
    # PRIV-POOL and ROOT-POOL; on release4.2 an unknown column is read as a property (Column.format
    # gives "-" for what has none).
    pools = qvm("qvm-ls", "--raw-data", "--fields", "name,priv-pool,root-pool", FULL).stdout
    if newer():
        templates = qvm("qvm-ls", "--raw-list", "--class", "TemplateVM").stdout.split()
        assert {FULL, MINIMAL} <= set(templates)
        assert "sys-net" not in templates
        heads = qvm("qvm-ls", "--format", "prefs", "sys-net").stdout.splitlines()[0]
        assert heads.split() == [*("NAME", "LABEL", "TEMPLATE", "NETVM"), *PREFS_NUMBERS]
        assert pools == f"{FULL}|varlibqubes|varlibqubes\n"
        return
    for option in ("--class", "--label", "--exclude-tags", "--prefs", "--sort"):
        refused = qvm("qvm-ls", option, "x", check=False)
        assert refused.returncode == 2, option
        assert f"unrecognized arguments: {option}" in refused.stderr
    for option in ("--reverse", "--ignore-case"):
        assert qvm("qvm-ls", option, check=False).returncode == 2, option
    refused = qvm("qvm-ls", "--format", "prefs", check=False)
    assert refused.returncode == 2
    assert "invalid choice: 'prefs'" in refused.stderr
    assert pools == f"{FULL}|-|-\n"


def only(name: str) -> str:
    """A pattern that matches `name` and no other qube name."""
    return f"{name[:-1]}[{name[-1]}]"


def test_qube_names_are_patterns_from_4_3(qvm: Qvm, new_name: NewName) -> None:
    # qubesadmin/tools/__init__.py VmNameAction.parse_qubes_app: release4.3 matches a word with
    # one of `*?[!]` against every qube's name (fnmatch) and names each qube once; release4.2
    # looks every word up as a name.
    first, second = new_name(), new_name()
    for name in (first, second):
        qvm("qvm-create", "--label", "red", "--property", "netvm=", name)
    patterns = [only(first), only(second)]
    listing = qvm("qvm-ls", "--raw-list", *patterns, check=False)
    started = qvm("qvm-start", *patterns, check=False)
    if newer():
        assert listing.stdout.split() == [first, second]
        assert started.returncode == 0, started
        assert qvm("qvm-check", "--running", "--quiet", first, second).returncode == 0
        qvm("qvm-kill", patterns[0], patterns[0], first)
        assert qvm("qvm-check", "--running", "--quiet", first, check=False).returncode == 1
        # a pattern that matches nothing leaves qvm-ls with no qube named: it lists them all
        everything = qvm("qvm-ls", "--raw-list").stdout
        assert qvm("qvm-ls", "--raw-list", "no-such-qube-*").stdout == everything
        return
    for result in (listing, started):
        assert result.returncode == 2
        assert f"no such domain: {patterns[0]!r}" in result.stderr
    assert qvm("qvm-check", "--running", "--quiet", first, check=False).returncode == 1


def test_qvm_prefs_hides_a_default_asked_for_by_name_from_4_3(
    qvm: Qvm, isolated_appvm: str
) -> None:
    # qubesadmin/tools/qvm_prefs.py process_actions: release4.3 applies --hide-default to the
    # value of one property too; release4.2 only to the listing.
    value = qvm("qvm-prefs", isolated_appvm, "vcpus").stdout
    assert value.strip().isdigit()
    hidden = qvm("qvm-prefs", "--hide-default", isolated_appvm, "vcpus").stdout
    assert hidden == ("" if newer() else value)
    assert qvm("qvm-prefs", "--hide-default", isolated_appvm, "label").stdout == "blue\n"


def test_qvm_remove_speaks_on_the_stream_of_its_release(qvm: Qvm, appvm: str) -> None:
    # qubesadmin/tools/qvm_remove.py main: release4.3 writes its messages on stderr and refuses
    # dom0 itself; release4.2 writes them on stdout, and asks before qubesd refuses dom0
    # (qubes-core-admin qubes/api/admin.py vm_remove), reported as parser.error_runtime does.
    cancelled = qvm("qvm-remove", appvm, input="n\n", check=False)
    assert cancelled.returncode == 1
    messages, other = (
        (cancelled.stderr, cancelled.stdout) if newer() else (cancelled.stdout, cancelled.stderr)
    )
    assert "This will completely remove the selected VM(s)..." in messages
    assert "Remove cancelled." in messages
    assert "Remove cancelled." not in other
    assert qvm("qvm-check", "--quiet", appvm).returncode == 0
    dom0 = qvm("qvm-remove", "--force", "dom0", check=False)
    assert dom0.returncode == 1
    if newer():
        assert (dom0.stdout, dom0.stderr) == ("", "Domain 'dom0' cannot be removed.\n")
    else:
        assert dom0.stderr.endswith("qvm-remove: error: 'dom0' cannot be removed\n")


def test_qvm_shutdown_all_with_exclusions_forces_only_on_4_2(qvm: Qvm, new_name: NewName) -> None:
    # qubesadmin/tools/qvm_shutdown.py main: `force = args.force or bool(args.all_domains)` on
    # release4.2, `... or (args.all_domains and not args.exclude)` on release4.3; a netvm whose
    # clients run is refused unless forced (qubes/vm/mix/net.py on_domain_pre_shutdown).
    net, client = new_name(), new_name()
    qvm("qvm-create", "--label", "orange", "--prop", "provides_network=True", net)
    qvm("qvm-prefs", net, "netvm", "")
    qvm("qvm-create", "--label", "red", "--prop", f"netvm={net}", client)
    qvm("qvm-start", client)
    excluded = [name for name in qvm("qvm-ls", "--raw-list").stdout.split() if name != net]
    command = ["qvm-shutdown", "--wait", "--all"]
    for name in excluded:
        command += ["--exclude", name]
    result = qvm(*command, check=False)
    net_runs = qvm("qvm-check", "--running", "--quiet", net, check=False).returncode == 0
    assert qvm("qvm-check", "--running", "--quiet", client).returncode == 0
    if newer():
        assert result.returncode == 1, result
        assert net_runs
    else:
        assert result.returncode == 0, result
        assert not net_runs
