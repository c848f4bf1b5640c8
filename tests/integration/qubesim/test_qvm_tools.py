"""The dom0 qvm tools: properties, volumes, tags, features, services, listing, and bad input."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.conftest import Qvm, host_release

# property -> a value to set, and how qvm-prefs prints it back
PROPERTY_VALUES = {
    "label": ("purple", "purple"),
    "template": (None, None),  # set below to the host template
    "netvm": ("sys-net", "sys-net"),
    "provides_network": ("true", "True"),
    "memory": ("800", "800"),
    "maxmem": ("8000", "8000"),
    "vcpus": ("4", "4"),
    "template_for_dispvms": ("True", "True"),
    "default_user": ("builder", "builder"),
    "qrexec_timeout": ("120", "120"),
}


def test_qvm_prefs_round_trips_every_property(
    qvm: Qvm, appvm: str, new_name: Callable[[], str]
) -> None:
    dispvm_template = new_name()
    qvm("qvm-create", "--label", "red", "--property", "template_for_dispvms=True", dispvm_template)
    host_template = qvm("qvm-prefs", appvm, "template").stdout.strip()
    values = {
        **PROPERTY_VALUES,
        "template": (host_template, host_template),
        "default_dispvm": (dispvm_template, dispvm_template),
    }
    for prop, (value, shown) in values.items():
        qvm("qvm-prefs", appvm, prop, value)
        assert qvm("qvm-prefs", appvm, prop).stdout == f"{shown}\n", prop
        listing = qvm("qvm-prefs", appvm).stdout
        assert any(line.split()[:2] == [prop, "-"] for line in listing.splitlines()), prop
    for prop in values.keys() - {"label", "template"}:
        qvm("qvm-prefs", "--default", appvm, prop)
        listing = qvm("qvm-prefs", appvm).stdout
        assert any(line.split()[:2] == [prop, "D"] for line in listing.splitlines()), prop
    assert qvm("qvm-prefs", appvm, "netvm").stdout == "sys-firewall\n"
    qvm("qvm-prefs", appvm, "netvm", "")
    assert qvm("qvm-prefs", appvm, "netvm").stdout == ""


@pytest.mark.parametrize(
    ("prop", "value", "message"),
    [
        ("no_such_prop", "1", "no such property: 'no_such_prop'"),
        ("klass", "TemplateVM", "read-only"),
        ("label", "pink", "Label does not exist: pink"),
        ("memory", "lots", "expected an integer"),
        ("provides_network", "maybe", "Invalid literal for boolean property: 'maybe'"),
        ("netvm", "no-such-qube", "Can't set netvm to non-existing qube no-such-qube"),
        ("template", "sys-net", "is of type AppVM and not TemplateVM"),
    ],
)
def test_qvm_prefs_rejects_bad_values(
    qvm: Qvm, appvm: str, prop: str, value: str, message: str
) -> None:
    before = qvm("qvm-prefs", appvm).stdout
    result = qvm("qvm-prefs", appvm, prop, value, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert qvm("qvm-prefs", appvm).stdout == before


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a" * 32, "shorter than 32"),
        ("1abc", "illegal characters"),
        ("has space", "illegal characters"),
        ("bad.dot", "illegal characters"),
        ("x-dm", "cannot end with -dm"),
        ("none", "reserved"),
    ],
)
def test_qvm_create_rejects_invalid_names(qvm: Qvm, name: str, message: str) -> None:
    result = qvm("qvm-create", "--label", "red", name, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert qvm("qvm-check", "--quiet", name, check=False).returncode == 1


def test_qvm_create_errors(qvm: Qvm, appvm: str, new_name: Callable[[], str]) -> None:
    name = new_name()
    cases = [
        (["--label", "red", appvm], "already exists"),
        ([name], "--label option is mandatory"),
        (["--label", "pink", name], "no such label: 'pink'"),
        (
            ["--label", "red", "--template", "no-such-template", name],
            "Error creating VM: Can't set template to non-existing qube no-such-template",
        ),
        (["--label", "red", "--template", appvm, name], "is of type AppVM and not TemplateVM"),
        (["--class", "HVM", "--label", "red", name], "no such domain class: 'HVM'"),
    ]
    for argv, message in cases:
        result = qvm("qvm-create", *argv, check=False)
        assert result.returncode != 0, argv
        assert message in result.stderr, argv
    assert qvm("qvm-check", "--quiet", name, check=False).returncode == 1


def test_qvm_remove_asks_then_removes_a_halted_qube(qvm: Qvm, appvm: str) -> None:
    cancelled = qvm("qvm-remove", appvm, input="n\n", check=False)
    assert cancelled.returncode == 1
    # on stderr from 4.3, on stdout before (test_releases.py names upstream's source)
    said = cancelled.stderr if host_release() == "4.3" else cancelled.stdout
    assert "Remove cancelled." in said
    qvm("qvm-remove", appvm, input="y\n")
    assert qvm("qvm-check", "--quiet", appvm, check=False).returncode == 1


def test_qvm_remove_refuses_a_template_in_use(qvm: Qvm, appvm: str) -> None:
    template = qvm("qvm-prefs", appvm, "template").stdout.strip()
    # A running qube is refused first, for another reason (it is not powered off).
    qvm("qvm-shutdown", "--wait", template)
    result = qvm("qvm-remove", "--force", template, check=False)
    assert result.returncode == 1
    assert "in use" in result.stderr


def test_qvm_volume_grows_and_refuses_to_shrink(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-volume", "extend", f"{appvm}:private", "20GiB")
    assert qvm("qvm-volume", "info", f"{appvm}:private", "size").stdout == f"{20 * 1024**3}\n"
    qvm("qvm-volume", "resize", f"{appvm}:private", "22G")
    assert qvm("qvm-volume", "info", f"{appvm}:private", "size").stdout == f"{22 * 1000**3}\n"
    result = qvm("qvm-volume", "extend", f"{appvm}:private", "1GiB", check=False)
    assert result.returncode == 1
    assert "shrinking" in result.stderr
    result = qvm("qvm-volume", "extend", f"{appvm}:private", "20 parsecs", check=False)
    assert result.returncode == 2
    assert "invalid size" in result.stderr
    assert qvm("qvm-volume", "info", f"{appvm}:private", "size").stdout == f"{22 * 1000**3}\n"


def test_qvm_tags(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-tags", appvm, "add", "created-by-test", "build")
    listed = ["build", "created-by-dom0", "created-by-test"]
    assert qvm("qvm-tags", appvm, "list").stdout.split() == listed
    qvm("qvm-tags", appvm, "del", "build")
    assert qvm("qvm-tags", appvm).stdout.split() == ["created-by-dom0", "created-by-test"]
    assert qvm("qvm-tags", appvm, "add", "bad tag", check=False).returncode == 1


def test_qvm_features(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-features", appvm, "menu-items", "firefox.desktop")
    assert qvm("qvm-features", appvm, "menu-items").stdout == "firefox.desktop\n"
    assert "menu-items" in qvm("qvm-features", appvm).stdout
    qvm("qvm-features", "--unset", appvm, "menu-items")
    assert qvm("qvm-features", appvm, "menu-items", check=False).returncode == 1


def test_qvm_service_reaches_the_qube(qvm: Qvm, appvm: str) -> None:
    qvm("qvm-service", appvm, "crond", "on")
    qvm("qvm-service", "--disable", appvm, "cups")
    assert qvm("qvm-service", appvm).stdout.split() == ["crond", "on", "cups", "off"]
    inside = qvm(
        "qvm-run", "--pass-io", appvm, "ls /run/qubes-service; qubesdb-read /qubes-service/cups"
    ).stdout.split()
    assert "crond" in inside and "cups" not in inside and inside[-1] == "0"


def test_qvm_ls_formats(qvm: Qvm, appvm: str) -> None:
    assert appvm in qvm("qvm-ls", "--raw-list").stdout.split()
    row = qvm("qvm-ls", "--raw-data", "--fields", "name,state,class,label,netvm", appvm).stdout
    assert row == f"{appvm}|Halted|AppVM|red|sys-firewall\n"
    qvm("qvm-start", appvm)
    assert appvm in qvm("qvm-ls", "--running", "--raw-list").stdout.split()
    table = qvm("qvm-ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "CLASS", "LABEL", "TEMPLATE", "NETVM"]
    assert any(line.split()[:3] == [appvm, "Running", "AppVM"] for line in table)


def test_tools_need_an_existing_qube(qvm: Qvm) -> None:
    for argv in (
        ["qvm-prefs", "nope"],
        ["qvm-start", "nope"],
        ["qvm-tags", "nope"],
        ["qvm-features", "nope"],
        ["qvm-service", "nope"],
        ["qvm-kill", "nope"],
        ["qvm-shutdown", "nope"],
        ["qvm-volume", "info", "nope:private"],
    ):
        result = qvm(*argv, check=False)
        assert (result.returncode, "no such domain: 'nope'" in result.stderr) == (2, True), argv
