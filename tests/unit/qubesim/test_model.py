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
    assert state.is_default("work", "klass")  # computed, as upstream's stateless properties
    assert not state.is_default("work", "name")
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
    # upstream's words: qubes/vm/mix/net.py, qubes/vm/appvm.py, qubes/vm/__init__.py
    with pytest.raises(QubesimError, match="The debian-12 qube does not provide network"):
        state.set_property("work", "netvm", "debian-12")
    with pytest.raises(QubesimError, match="is of type AppVM and not TemplateVM"):
        state.set_property("work", "template", "sys-net")
    with pytest.raises(QubesimError, match="has template_for_dispvms set to False"):
        state.set_property("work", "default_dispvm", "sys-net")
    with pytest.raises(QubesimError, match="Loops in network are unsupported"):
        state.set_property("sys-net", "netvm", "sys-net")
    with pytest.raises(QubesimError, match="Loops in network are unsupported"):
        state.set_property("sys-net", "netvm", "sys-firewall")
    with pytest.raises(QubesimError, match="Can't set netvm to non-existing qube ghost"):
        state.set_property("work", "netvm", "ghost")
    state.set_property("work", "template_for_dispvms", "True")
    state.set_property("work", "default_dispvm", "work")  # its own disposable template: allowed


def test_rules_that_depend_on_what_runs(state: State) -> None:
    state.add_qube("other-template", "TemplateVM", "black", None)
    state.set_property("work", "netvm", "")
    state.is_running = lambda name: name == "work"
    with pytest.raises(QubesimError, match="Cannot change template while qube is running"):
        state.set_property("work", "template", "other-template")
    with pytest.raises(QubesimError, match="Cannot dynamically attach to stopped qube sys-net"):
        state.set_property("work", "netvm", "sys-net")
    assert state.get_property("work", "netvm") is None
    assert state.get_property("work", "template") == "debian-12"


def test_provides_network_stays_while_used(state: State) -> None:
    with pytest.raises(QubesimError, match="still used by other qubes"):
        state.set_property("sys-firewall", "provides_network", "False")
    state.set_property("work", "netvm", "")
    state.set_property("sys-firewall", "provides_network", "False")


def test_defaults_come_from_the_template(state: State) -> None:
    state.set_property("debian-12", "memory", "600")
    assert state.get_property("work", "memory") == 600
    assert state.is_default("work", "memory")
    assert state.get_property("work", "ip") == f"10.137.0.{state.qube('work')['qid']}"
    state.set_property("work", "netvm", "")
    assert state.get_property("work", "ip") is None


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
    for prop, value, message in (
        ("memory", "-1", "memory must be positive"),
        ("memory", "1k", "invalid value"),
        ("vcpus", "", "invalid value"),
        ("vcpus", "0", "vcpus must be positive"),
        ("maxmem", "-1", "maxmem must be positive or zero"),
        ("provides_network", "2", "Invalid literal for boolean property: '2'"),
        ("default_user", "a b", "Username can contain only those characters"),
        ("label", "pink", "Label does not exist: pink"),
    ):
        with pytest.raises(QubesimError, match=message):
            state.set_property("work", prop, value)
    state.set_property("work", "maxmem", "0")


def test_add_qube_rules(state: State) -> None:
    with pytest.raises(QubesimError, match="already exists"):
        state.add_qube("work", "AppVM", "red", None)
    with pytest.raises(UsageError, match="no such domain class: 'HVM'"):
        state.add_qube("x", "HVM", "red", None)
    with pytest.raises(QubesimError, match="non-existing qube ghost"):
        state.add_qube("x", "AppVM", "red", "ghost")
    with pytest.raises(QubesimError, match="template_for_dispvms=True"):
        state.add_qube("x", "DispVM", "red", "work")
    assert "x" not in state.qubes  # a failed creation leaves nothing behind
    state.set_property("work", "template_for_dispvms", "True")
    state.add_qube("disposable", "DispVM", "red", "work")
    assert state.get_property("disposable", "netvm") == "sys-firewall"  # its template's
    state.add_qube("alone", "StandaloneVM", "red", None)
    assert not state.has_property("alone", "template")
    assert state.get_property("alone", "updateable") is True


def test_dependents(state: State) -> None:
    assert state.dependents("debian-12") == [
        ("sys-firewall", "template"),
        ("sys-net", "template"),
        ("work", "template"),
        (None, "default_template"),
    ]
    assert ("work", "netvm") in state.dependents("sys-firewall")
