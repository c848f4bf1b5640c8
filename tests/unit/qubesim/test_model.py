"""The qubes database rules, on a state in memory."""

from __future__ import annotations

import pytest

from qubesim.errors import NoSuchQube, QubesimError, UsageError
from qubesim.model import State, initial_state


@pytest.fixture
def state() -> State:
    result = State(initial_state())
    result.add_qube("debian-12", "TemplateVM", "black", None)
    result.defaults["default_template"] = "debian-12"
    for name, netvm in (("sys-net", ""), ("sys-firewall", "sys-net")):
        result.add_qube(name, "AppVM", "red", None)
        result.set_property(name, "provides_network", "True")
        result.set_property(name, "netvm", netvm)
    result.defaults["default_netvm"] = "sys-firewall"
    result.add_qube("work", "AppVM", "blue", None)
    return result


def test_defaults_follow_qubes(state: State) -> None:
    assert state.get_property("work", "template") == "debian-12"
    assert state.get_property("work", "netvm") == "sys-firewall"
    assert state.is_default("work", "netvm")
    assert state.get_property("debian-12", "netvm") is None  # templates have no network
    assert state.get_property("sys-firewall", "netvm") == "sys-net"
    assert not state.has_property("dom0", "netvm")
    assert not state.has_property("debian-12", "template")


def test_network_isolation(state: State) -> None:
    assert not state.network_isolated("work")
    assert not state.network_isolated("sys-net")  # no netvm, but it provides the network
    state.set_property("work", "netvm", "")
    assert state.network_isolated("work")
    assert not state.is_default("work", "netvm")
    state.reset_property("work", "netvm")
    assert state.get_property("work", "netvm") == "sys-firewall"


def test_vm_properties_check_their_target(state: State) -> None:
    with pytest.raises(QubesimError, match="does not provide network"):
        state.set_property("work", "netvm", "debian-12")
    with pytest.raises(QubesimError, match="is not a TemplateVM"):
        state.set_property("work", "template", "sys-net")
    with pytest.raises(QubesimError, match="not a disposable template"):
        state.set_property("work", "default_dispvm", "sys-net")
    with pytest.raises(QubesimError, match="cannot refer to itself"):
        state.set_property("sys-net", "netvm", "sys-net")
    with pytest.raises(QubesimError, match="no such domain: 'ghost'"):
        state.set_property("work", "netvm", "ghost")


def test_read_only_and_unknown_properties(state: State) -> None:
    with pytest.raises(QubesimError, match="read-only"):
        state.set_property("work", "klass", "TemplateVM")
    with pytest.raises(UsageError, match="no such property: 'colour'"):
        state.get_property("work", "colour")
    with pytest.raises(NoSuchQube, match="no such domain: 'ghost'"):
        state.get_property("ghost", "label")


def test_typed_values(state: State) -> None:
    state.set_property("work", "memory", "1024")
    state.set_property("work", "provides_network", "yes")
    assert state.get_property("work", "memory") == 1024
    assert state.get_property("work", "provides_network") is True
    for prop, value in (
        ("memory", "-1"),
        ("memory", "1k"),
        ("vcpus", ""),
        ("provides_network", "2"),
    ):
        with pytest.raises(QubesimError, match="invalid value"):
            state.set_property("work", prop, value)


def test_add_qube_rules(state: State) -> None:
    with pytest.raises(QubesimError, match="already exists"):
        state.add_qube("work", "AppVM", "red", None)
    with pytest.raises(UsageError, match="unsupported class"):
        state.add_qube("x", "DispVM", "red", None)
    with pytest.raises(QubesimError, match="no such domain: 'ghost'"):
        state.add_qube("x", "AppVM", "red", "ghost")
    assert "x" not in state.qubes  # a failed creation leaves nothing behind


def test_dependents(state: State) -> None:
    assert state.dependents("debian-12") == [
        "sys-firewall (template)",
        "sys-net (template)",
        "work (template)",
        "global default_template",
    ]
    assert "work (netvm)" in state.dependents("sys-firewall")
