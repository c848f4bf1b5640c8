"""The dom0 tools answer as upstream's do: one test per behaviour of Qubes that playbooks meet.

Each test names where upstream states the behaviour: qubesadmin's tools are in
QubesOS/qubes-core-admin-client (qubesadmin/tools/), qubesd's rules in QubesOS/qubes-core-admin
(qubes/vm/). A test here describes Qubes, never qubesim: on a real dom0 it passes too.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from tests.integration.conftest import Qvm, host_release

NewName = Callable[[], str]


def refused(result: subprocess.CompletedProcess[str], tool: str, message: str) -> None:
    """A refusal reported as qubesadmin reports qubesd's errors (error_runtime): rc 1, stderr."""
    assert result.returncode == 1, result
    assert f"{tool}: error: {message}" in result.stderr, result.stderr
    assert result.stdout == ""


def netvm_qube(qvm: Qvm, new_name: NewName, *, netvm: str = "") -> str:
    name = new_name()
    qvm("qvm-create", "--label", "orange", "--prop", "provides_network=True", name)
    qvm("qvm-prefs", name, "netvm", netvm)
    return name


def test_qvm_prefs_prints_an_empty_reference_as_none_and_its_get_as_nothing(
    qvm: Qvm, appvm: str
) -> None:
    # qubesadmin/tools/qvm_prefs.py process_actions: the listing prints str(value), which is
    # "None" for an empty qube reference; a get prints only a value that is not None.
    qvm("qvm-prefs", appvm, "netvm", "")
    listing = {
        line.split()[0]: line.split()[1:] for line in qvm("qvm-prefs", appvm).stdout.splitlines()
    }
    assert listing["netvm"] == ["-", "None"]
    assert listing["default_dispvm"] == ["D", "None"]
    # qubes/__init__.py stateless_property: klass is computed, never set, so listed as default
    assert listing["klass"] == ["D", "AppVM"]
    assert listing["name"] == ["-", appvm]
    assert qvm("qvm-prefs", appvm, "netvm").stdout == ""
    assert qvm("qvm-prefs", appvm, "default_dispvm").stdout == ""
    qvm("qvm-prefs", appvm, "netvm", "None")  # qvm-prefs reads "none" as the empty reference
    assert qvm("qvm-prefs", appvm, "netvm").stdout == ""


def test_qubesd_refuses_what_qubes_refuses_and_keeps_the_old_value(
    qvm: Qvm, new_name: NewName
) -> None:
    # qubes/vm/qubesvm.py _setter_positive_int, _setter_default_user; qubes/vm/mix/net.py
    # _setter_netvm (loops), _setter_provides_network, on_property_pre_set_netvm;
    # qubes/vm/appvm.py on_property_pre_set_template. qvm_prefs.py reports them by error_runtime.
    net = netvm_qube(qvm, new_name)
    inner = netvm_qube(qvm, new_name, netvm=net)
    client = new_name()
    qvm("qvm-create", "--label", "red", "--prop", f"netvm={net}", client)
    running = new_name()
    qvm("qvm-create", "--label", "red", "--prop", "netvm=", running)
    qvm("qvm-start", running)
    template = qvm("qvm-prefs", running, "template").stdout.strip()
    cases = [
        (client, "vcpus", "0", "vcpus must be positive"),
        (client, "memory", "-400", "memory must be positive"),
        (client, "qrexec_timeout", "0", "qrexec_timeout must be positive"),
        (client, "default_user", "us er", "Username can contain only those characters: "),
        (client, "default_user", "us:er", "Username can contain only those characters: "),
        (net, "netvm", net, "Loops in network are unsupported"),
        (net, "netvm", inner, "Loops in network are unsupported"),
        (net, "provides_network", "False", "The qube is still used by other qubes"),
        # qubes/__init__.py property.__set__ fires property-pre-set even for the same value
        (running, "template", template, "Cannot change template while qube is running"),
        (running, "netvm", net, f"Cannot dynamically attach to stopped qube {net}"),
    ]
    for qube, prop, value, message in cases:
        before = qvm("qvm-prefs", qube).stdout
        refused(qvm("qvm-prefs", qube, prop, value, check=False), "qvm-prefs", message)
        assert qvm("qvm-prefs", qube).stdout == before, (prop, value)
    qvm("qvm-prefs", client, "default_user", "build_er-1+,.")


def test_qvm_shutdown_refuses_a_netvm_in_use_unless_forced(qvm: Qvm, new_name: NewName) -> None:
    # qubesadmin/tools/qvm_shutdown.py run_async: the exit code is the number of qubes that
    # failed; qubes/vm/mix/net.py on_domain_pre_shutdown refuses while connected qubes run.
    # --timeout is deprecated there: it only turns --wait on.
    net = netvm_qube(qvm, new_name)
    inner = netvm_qube(qvm, new_name, netvm=net)
    client = new_name()
    qvm("qvm-create", "--label", "red", "--prop", f"netvm={inner}", client)
    qvm("qvm-start", client)
    result = qvm("qvm-shutdown", "--wait", net, inner, check=False)
    assert result.returncode == 2, result
    assert f"Failed to shut down: {net}: There are other VMs connected to this VM: {inner}" in (
        result.stderr
    )
    assert f"Failed to shut down: {inner}: There are other VMs connected to this VM: {client}" in (
        result.stderr
    )
    assert qvm("qvm-check", "--running", "--quiet", net, inner, client).returncode == 0
    forced = qvm("qvm-shutdown", "--force", "--wait", inner)
    assert forced.stdout == ""
    assert qvm("qvm-check", "--running", "--quiet", inner, check=False).returncode == 1
    assert qvm("qvm-check", "--running", "--quiet", client).returncode == 0
    qvm("qvm-shutdown", "--timeout", "5", client)
    assert qvm("qvm-check", "--running", "--quiet", client, check=False).returncode == 1


def test_qvm_remove_refuses_a_running_qube_even_with_force(qvm: Qvm, appvm: str) -> None:
    # qubesadmin/tools/qvm_remove.py main: --force only skips the prompt; qubes/app.py
    # VMCollection.__delitem__ refuses a qube that is not halted (QubesVMNotHaltedError).
    qvm("qvm-prefs", appvm, "netvm", "")
    qvm("qvm-start", appvm)
    result = qvm("qvm-remove", "--force", appvm, check=False)
    refused(result, "qvm-remove", f"Domain is not powered off: {appvm!r}")
    assert qvm("qvm-check", "--running", "--quiet", appvm).returncode == 0


def test_qvm_create_options_and_classes(qvm: Qvm, new_name: NewName) -> None:
    # qubesadmin/tools/qvm_create.py main: -p is --pool VOLUME=POOL; properties only through
    # --property/--prop, set after creation (failure: "but VM created", rc 2); --standalone and
    # --disp set the class. qubes/api/admin.py vm_create tags the new qube created-by-dom0.
    pooled = new_name()
    qvm("qvm-create", "--label", "red", "-p", "private=varlibqubes", pooled)
    assert qvm("qvm-tags", pooled, "list").stdout == "created-by-dom0\n"
    bad_pool = qvm("qvm-create", "--label", "red", "-p", "memory", new_name(), check=False)
    assert bad_pool.returncode == 2
    assert "Pool argument must be of form: -p volume_name=pool_name" in bad_pool.stderr
    half = new_name()
    result = qvm("qvm-create", "--label", "red", "--prop", "vcpus=0", half, check=False)
    assert result.returncode == 2, result
    assert "Error setting property vcpus (but VM created)" in result.stderr
    assert qvm("qvm-prefs", half, "vcpus").stdout == "2\n"
    standalone = new_name()
    qvm("qvm-create", "--standalone", "--label", "green", standalone)
    assert qvm("qvm-prefs", standalone, "klass").stdout == "StandaloneVM\n"
    dvm_template = new_name()
    qvm("qvm-create", "--label", "red", "--prop", "template_for_dispvms=True", dvm_template)
    disposable = new_name()
    qvm("qvm-create", "--disp", "--template", dvm_template, disposable)
    assert qvm("qvm-prefs", disposable, "klass").stdout == "DispVM\n"
    assert qvm("qvm-prefs", disposable, "label").stdout == "red\n"
    assert qvm("qvm-prefs", disposable, "template").stdout == f"{dvm_template}\n"
    not_disposable = qvm(
        "qvm-create",
        "--class",
        "DispVM",
        "--label",
        "red",
        "--template",
        pooled,
        new_name(),
        check=False,
    )
    assert not_disposable.returncode == 1
    assert "Error creating VM" in not_disposable.stderr


def test_qvm_service_flags_words_and_list(qvm: Qvm, appvm: str) -> None:
    # qubesadmin/tools/qvm_service.py: -e/-d are store_const (no argument), -D unsets, --list
    # lists; parse_bool takes 0/no/false/off and 1/yes/true/on, anything else is rc 1.
    qvm("qvm-service", appvm, "cups", "-e")
    qvm("qvm-service", "--disable", appvm, "crond")
    qvm("qvm-service", appvm, "updates-proxy-setup", "yes")
    listing = qvm("qvm-service", "--list", appvm).stdout.splitlines()
    assert sorted(line.split() for line in listing) == [
        ["crond", "off"],
        ["cups", "on"],
        ["updates-proxy-setup", "on"],
    ]
    assert qvm("qvm-features", appvm, "service.cups").stdout == "1\n"
    bad = qvm("qvm-service", appvm, "cups", "enabled", check=False)
    refused(bad, "qvm-service", "Invalid literal for boolean value: 'enabled'")
    qvm("qvm-service", appvm, "cups", "-D")
    unset = qvm("qvm-service", appvm, "cups", check=False)
    assert (unset.returncode, unset.stdout) == (1, "")


def test_qvm_check_exit_codes_and_filters(qvm: Qvm, new_name: NewName) -> None:
    # qubesadmin/tools/qvm_check.py main: a missing qube is rc 1 and logged "non-existent!" on
    # stderr; filters that only some qubes pass give rc 3; --paused, --template, --networked, --all.
    isolated = new_name()
    qvm("qvm-create", "--label", "red", "--prop", "netvm=", isolated)
    networked = new_name()
    qvm("qvm-create", "--label", "red", networked)
    missing = qvm("qvm-check", isolated, "no-such-qube", check=False)
    assert missing.returncode == 1
    assert "no-such-qube: non-existent!" in missing.stderr
    assert missing.stdout == ""
    assert qvm("qvm-check", isolated).stderr == f"qvm-check: {isolated}: exists\n"
    qvm("qvm-start", isolated)
    assert qvm("qvm-check", "--running", isolated, networked, check=False).returncode == 3
    assert qvm("qvm-check", "--paused", isolated, check=False).returncode == 1
    assert qvm("qvm-check", "--networked", isolated, check=False).returncode == 1
    assert qvm("qvm-check", "--networked", networked).returncode == 0
    assert qvm("qvm-check", "--template", isolated, check=False).returncode == 1
    template = qvm("qvm-prefs", networked, "template").stdout.strip()
    assert qvm("qvm-check", "--template", template).returncode == 0
    assert qvm("qvm-check", "--all").returncode == 0


def test_qvm_tags_aliases_and_exit_codes(qvm: Qvm, appvm: str) -> None:
    # qubesadmin/tools/qvm_tags.py get_parser, mode_query, mode_del: aliases list/ls/l,
    # add/a/set, del/d/unset/u; deleting an absent tag is rc 0; `list TAG` prints it or is rc 1.
    qvm("qvm-tags", appvm, "set", "one", "two")
    qvm("qvm-tags", appvm, "a", "three")
    qvm("qvm-tags", appvm, "unset", "one")
    qvm("qvm-tags", appvm, "u", "never-set")
    assert qvm("qvm-tags", appvm, "ls").stdout.split() == ["created-by-dom0", "three", "two"]
    assert qvm("qvm-tags", appvm, "l", "two").stdout == "two\n"
    absent = qvm("qvm-tags", appvm, "list", "one", check=False)
    assert (absent.returncode, absent.stdout) == (1, "")
    assert qvm("qvm-tags", appvm, "d", "two", "three", check=False).returncode == 2


def test_qvm_ls_formats_filters_and_fields(qvm: Qvm, new_name: NewName) -> None:
    # qubesadmin/tools/qvm_ls.py get_parser, main, Column.cell (None and "" print as "-"),
    # PropertyColumn (an unknown field is read as a property), on release4.2 and release4.3.
    first, second = new_name(), new_name()
    qvm("qvm-create", "--label", "purple", "--prop", "netvm=", first)
    qvm("qvm-create", "--label", "yellow", second)
    qvm("qvm-tags", second, "add", "skip-me")
    row = qvm("qvm-ls", "--raw-data", "-O", "name,netvm,provides_network,no_such_field", first)
    assert row.stdout == f"{first}|-|False|-\n"
    header = qvm("qvm-ls", "-O", "name,provides_network", first).stdout.splitlines()[0]
    assert header.split() == ["NAME", "PROVIDES-NETWORK"]
    kernel = qvm("qvm-ls", "--raw-data", "-o", "kernel", first).stdout.split("|")
    assert kernel[:4] == [
        first,
        "Halted",
        "AppVM",
        qvm("qvm-prefs", first, "template").stdout.strip(),
    ]
    everyone = qvm("qvm-ls", "--raw-list", "--all", "--exclude", first).stdout.split()
    assert "dom0" in everyone and second in everyone and first not in everyone
    assert qvm("qvm-ls", "--raw-list", "--tags", "skip-me").stdout.split() == [second]
    assert qvm("qvm-ls", "--raw-list", "--paused").stdout == ""


def test_qvm_ls_filters_and_sorting_of_4_3(qvm: Qvm, new_name: NewName) -> None:
    # qubesadmin/tools/qvm_ls.py get_parser and main (release4.3: --class, --label,
    # --exclude-tags, --prefs), Table.write_table (--sort, --reverse).
    if host_release() != "4.3":
        pytest.skip("qvm-ls filters and sorts from 4.3 (test_releases.py: 4.2 refuses them)")
    first, second = new_name(), new_name()
    qvm("qvm-create", "--label", "purple", "--prop", "netvm=", first)
    qvm("qvm-create", "--label", "yellow", second)
    qvm("qvm-tags", second, "add", "skip-me")
    templates = qvm("qvm-ls", "--raw-list", "--class", "TemplateVM").stdout.split()
    assert first not in templates and templates
    assert qvm("qvm-ls", "--raw-list", "--label", "purple").stdout.split() == [first]
    # options of nargs="+" (argparse, as upstream) end where the qube names begin
    kept = qvm("qvm-ls", "--raw-list", first, second, "--exclude-tags", "skip-me").stdout.split()
    assert kept == [first]
    unnetworked = qvm("qvm-ls", "--raw-list", first, second, "--prefs", "netvm=None").stdout
    assert unnetworked.split() == [first]
    by_label = qvm("qvm-ls", "-O", "name,label", "--sort", "label", first, second).stdout
    assert [line.split()[0] for line in by_label.splitlines()[1:]] == [first, second]
    reverse = qvm("qvm-ls", "-O", "name,label", "--sort", "label", "--reverse", first, second)
    assert [line.split()[0] for line in reverse.stdout.splitlines()[1:]] == [second, first]


# qubes/vm/qubesvm.py and qubes/vm/mix/net.py: the properties, their defaults and their checks.
UPSTREAM_DEFAULTS = {
    "autostart": "False",
    "debug": "False",
    "include_in_backups": "True",
    "virt_mode": "pvh",
    "shutdown_timeout": "60",
    "mac": "00:16:3e:5e:6c:00",
    "guivm": "dom0",
    "audiovm": "dom0",
    "kernelopts": "",
    "updateable": "False",
    "installed_by_rpm": "False",
}


def test_upstream_properties_with_their_defaults_and_checks(qvm: Qvm, new_name: NewName) -> None:
    # qubes/vm/qubesvm.py QubesVM properties (_setter_virt_mode, _setter_kernel,
    # _setter_kernelopts, _setter_positive_int), qubes/vm/mix/net.py (_setter_mac, _default_ip),
    # qubes/vm/__init__.py validate_disposable_template (a disposable template may be its own).
    name = new_name()
    qvm("qvm-create", "--label", "red", name)
    listing = {
        line.split()[0]: " ".join(line.split()[2:])
        for line in qvm("qvm-prefs", name).stdout.splitlines()
    }
    for prop, value in UPSTREAM_DEFAULTS.items():
        assert listing[prop] == value, prop
    qid = qvm("qvm-prefs", name, "qid").stdout.strip()
    assert listing["ip"] == f"10.137.0.{qid}"
    assert listing["management_dispvm"] == "None"
    assert listing["kernel"]
    cases = [
        ("virt_mode", "kvm", "Invalid virtualization mode, supported values: hvm, pv, pvh"),
        ("kernel", "../vmlinuz", "Kernel name cannot contain '/'"),
        ("kernelopts", "x" * 513, "Kernelopts value too long (512 chars max)"),
        ("shutdown_timeout", "0", "shutdown_timeout must be positive"),
        ("mac", "00:16:3e", "Invalid MAC address value"),
    ]
    for prop, value, message in cases:
        refused(qvm("qvm-prefs", name, prop, value, check=False), "qvm-prefs", message)
    qvm("qvm-prefs", name, "virt_mode", "HVM")
    assert qvm("qvm-prefs", name, "virt_mode").stdout == "hvm\n"
    qvm("qvm-prefs", name, "autostart", "True")
    qvm("qvm-prefs", name, "template_for_dispvms", "True")
    qvm("qvm-prefs", name, "default_dispvm", name)
    assert qvm("qvm-prefs", name, "default_dispvm").stdout == f"{name}\n"


def test_errors_are_printed_on_stderr(qvm: Qvm, appvm: str) -> None:
    # qubesadmin/tools/qvm_start.py main (release4.2, release4.3): a running qube is an error,
    # said by parser.print_error (qubesadmin/tools/__init__.py), which puts "Error:" before it
    # from 4.3; errors go to stderr, stdout stays empty.
    qvm("qvm-prefs", appvm, "netvm", "")
    qvm("qvm-start", appvm)
    again = qvm("qvm-start", appvm, check=False)
    assert again.returncode == 1
    assert again.stdout == ""
    prefix = "Error: " if host_release() == "4.3" else ""
    assert again.stderr == f"{prefix}domain {appvm} is already running\n"
    assert qvm("qvm-start", "--skip-if-running", appvm).stderr == ""
    # qubesadmin/tools/qvm_features.py main: an unset feature is rc 1, and nothing is printed
    unset = qvm("qvm-features", appvm, "no-such-feature", check=False)
    assert (unset.returncode, unset.stdout, unset.stderr) == (1, "", "")
