"""The qube properties of Qubes: their types, defaults and the checks qubesd makes on a change.

Upstream defines them in qubes-core-admin (qubes/vm/qubesvm.py, qubes/vm/mix/net.py,
qubes/vm/appvm.py, qubes/vm/dispvm.py); qubesim keeps the ones that a dom0 admin meets, with the
same defaults, the same refusals and the same words, so that what passes here passes on Qubes.
"""

from __future__ import annotations

import platform
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qubesim.errors import QubesimError

if TYPE_CHECKING:
    from qubesim.model import State

ADMIN_VM = "dom0"
TEMPLATE_BASED = frozenset({"AppVM", "DispVM"})  # the classes that have a `template`
OWN_ROOT = frozenset({"TemplateVM", "StandaloneVM"})  # the classes with a root volume of their own
VM_CLASSES = frozenset({"AppVM", "TemplateVM", "StandaloneVM", "DispVM"})
# qubes/vm/qubesvm.py _setter_default_user: the characters a default user may have
USER_CHARACTERS = string.ascii_letters + string.digits + "_-+,."
VIRT_MODES = ("hvm", "pv", "pvh")
KERNELOPTS_MAX = 512
_MAC = re.compile(r"([0-9a-f][0-9a-f]:){5}[0-9a-f][0-9a-f]")

Default = Callable[["State", str], Any]
# A check gets the state, the qube and the parsed value; it returns the value to store.
Check = Callable[["State", str, Any], Any]


class RefusedValue(QubesimError):
    """qubesd refused a value (QubesValueError and its kin): rc 1, with upstream's words."""


@dataclass(frozen=True)
class Property:
    """One qvm-prefs property: its type, its default, which classes have it, and its check."""

    name: str
    kind: str  # str | int | bool | label | vm
    default: Default
    writable: bool = True
    classes: frozenset[str] | None = None  # None: every qube and dom0
    check: Check | None = None
    # Set for every qube at creation (name, qid, uuid): qvm-prefs never lists them as default.
    always_set: bool = False


# -- defaults -------------------------------------------------------------------------------------
def _none(_state: State, _name: str) -> None:
    return None


def _constant(value: Any) -> Default:
    return lambda _state, _name: value


def _global(key: str) -> Default:
    return lambda state, _name: state.global_default(key)


def _with_template(prop: str, fallback: Default) -> Default:
    """qubes/vm/qubesvm.py _default_with_template: a template-based qube takes its template's."""

    def default(state: State, name: str) -> Any:
        if state.qube(name)["klass"] in TEMPLATE_BASED:
            return state.get_property(state.get_property(name, "template"), prop)
        return fallback(state, name)

    return default


def _default_netvm(state: State, name: str) -> str | None:
    klass = state.qube(name)["klass"]
    if klass == "TemplateVM":
        return None
    if klass == "DispVM":
        return state.get_property(state.get_property(name, "template"), "netvm")
    default = state.global_default("default_netvm")
    if state.get_property(name, "provides_network") or default == name:
        return None
    return default


def _default_ip(state: State, name: str) -> str | None:
    """qubes/vm/mix/net.py _default_ip and vmid_to_ipv4: networked qubes get 10.137.x.y."""
    if not state.is_networked(name):
        return None
    record = state.qube(name)
    prefix = "10.138" if record["klass"] == "DispVM" else "10.137"
    vmid = record["qid"]
    if vmid < 255:
        return f"{prefix}.{(vmid >> 8) & 0xFF}.{vmid & 0xFF}"
    vmid -= 1
    return f"{prefix}.{vmid // 254}.{vmid % 254 + 1}"


# -- checks ---------------------------------------------------------------------------------------
def _positive(prop: str) -> Check:
    """qubes/vm/qubesvm.py _setter_positive_int."""

    def check(_state: State, _name: str, value: int) -> int:
        if value <= 0:
            raise RefusedValue(f"{prop} must be positive")
        return value

    return check


def _not_negative(prop: str) -> Check:
    """qubes/vm/qubesvm.py _setter_non_negative_int."""

    def check(_state: State, _name: str, value: int) -> int:
        if value < 0:
            raise RefusedValue(f"{prop} must be positive or zero")
        return value

    return check


def _default_user(_state: State, _name: str, value: str) -> str:
    if not all(character in USER_CHARACTERS for character in value):
        raise RefusedValue("Username can contain only those characters: " + USER_CHARACTERS)
    return value


def _virt_mode(_state: State, _name: str, value: str) -> str:
    if value.lower() not in VIRT_MODES:
        raise RefusedValue("Invalid virtualization mode, supported values: hvm, pv, pvh")
    return value.lower()


def _kernel(_state: State, _name: str, value: str) -> str:
    if "/" in value:
        raise RefusedValue("Kernel name cannot contain '/'")
    return value


def _kernelopts(_state: State, _name: str, value: str) -> str:
    if len(value) > KERNELOPTS_MAX:
        raise RefusedValue(f"Kernelopts value too long ({KERNELOPTS_MAX} chars max)")
    return value


def _mac(_state: State, _name: str, value: str) -> str:
    if not _MAC.fullmatch(value.lower()):
        raise RefusedValue("Invalid MAC address value")
    return value.lower()


def _netvm(state: State, name: str, value: str | None) -> str | None:
    """qubes/vm/mix/net.py _setter_netvm and on_property_pre_set_netvm."""
    if value is None:
        return None
    if not state.provides_network(value):
        raise RefusedValue(f"The {value} qube does not provide network")
    if value == name or value in state.connected_to(name):
        raise RefusedValue("Loops in network are unsupported")
    if state.is_running(name) and not state.is_running(value):
        raise RefusedValue(f"Cannot dynamically attach to stopped qube {value}")
    return value


def _provides_network(state: State, name: str, value: bool) -> bool:
    """qubes/vm/mix/net.py _setter_provides_network."""
    if not value and state.clients(name):
        raise RefusedValue("The qube is still used by other qubes, change theirs 'netvm' first")
    return value


def _template(state: State, name: str, value: str | None) -> str:
    """qubes/vm/appvm.py (a TemplateVM; never while running) and dispvm.py _setter_template."""
    if value is None:
        raise RefusedValue("Cannot unset template")
    klass = state.qube(value)["klass"]
    if state.qube(name)["klass"] == "DispVM":
        if not state.is_disposable_template(value):
            raise RefusedValue("template for disposable must have template_for_dispvms=True")
    elif klass != "TemplateVM":
        raise RefusedValue(
            f"wrong VM class: domains[{value!r}] is of type {klass} and not TemplateVM"
        )
    if state.is_running(name):
        raise RefusedValue("Cannot change template while qube is running")
    return value


def _disposable_template(prop: str) -> Check:
    """qubes/vm/__init__.py validate_disposable_template (a qube may name itself)."""

    def check(state: State, name: str, value: str | None) -> str | None:
        if value is not None and not state.is_disposable_template(value):
            raise RefusedValue(
                f"Cannot set invalid property to qube {name!r}, {prop} {value!r} has "
                "template_for_dispvms set to False"
            )
        return value

    return check


PROPERTIES: dict[str, Property] = {
    prop.name: prop
    for prop in (
        Property("name", "str", lambda _s, name: name, writable=False, always_set=True),
        Property("klass", "str", lambda s, name: s.qube(name)["klass"], writable=False),
        Property(
            "uuid", "str", lambda s, name: s.qube(name)["uuid"], writable=False, always_set=True
        ),
        Property(
            "qid", "int", lambda s, name: s.qube(name)["qid"], writable=False, always_set=True
        ),
        Property("label", "label", _none),
        Property("template", "vm", _none, classes=TEMPLATE_BASED, check=_template),
        Property("netvm", "vm", _default_netvm, classes=VM_CLASSES, check=_netvm),
        Property(
            "provides_network",
            "bool",
            _constant(False),
            classes=VM_CLASSES,
            check=_provides_network,
        ),
        Property("ip", "str", _default_ip, classes=VM_CLASSES),
        Property("mac", "str", _constant("00:16:3e:5e:6c:00"), classes=VM_CLASSES, check=_mac),
        Property(
            "memory",
            "int",
            _with_template("memory", _constant(400)),
            classes=VM_CLASSES,
            check=_positive("memory"),
        ),
        Property(
            "maxmem",
            "int",
            _with_template("maxmem", _constant(4000)),
            classes=VM_CLASSES,
            check=_not_negative("maxmem"),
        ),
        Property(
            "vcpus",
            "int",
            _with_template("vcpus", _constant(2)),
            classes=VM_CLASSES,
            check=_positive("vcpus"),
        ),
        Property(
            "virt_mode",
            "str",
            _with_template("virt_mode", _constant("pvh")),
            classes=VM_CLASSES,
            check=_virt_mode,
        ),
        Property(
            "kernel",
            "str",
            _with_template("kernel", _global("default_kernel")),
            classes=VM_CLASSES,
            check=_kernel,
        ),
        Property(
            "kernelopts",
            "str",
            _with_template("kernelopts", _constant("")),
            classes=VM_CLASSES,
            check=_kernelopts,
        ),
        Property("debug", "bool", _constant(False), classes=VM_CLASSES),
        Property("autostart", "bool", _constant(False), classes=VM_CLASSES),
        Property("include_in_backups", "bool", _constant(True), classes=VM_CLASSES),
        Property("installed_by_rpm", "bool", _constant(False), classes=VM_CLASSES),
        Property(
            "updateable",
            "bool",
            lambda s, name: s.qube(name)["klass"] in OWN_ROOT,
            writable=False,
            classes=VM_CLASSES,
        ),
        Property(
            "default_user",
            "str",
            _with_template("default_user", _constant("user")),
            classes=VM_CLASSES,
            check=_default_user,
        ),
        Property(
            "qrexec_timeout",
            "int",
            _with_template("qrexec_timeout", _constant(60)),
            classes=VM_CLASSES,
            check=_positive("qrexec_timeout"),
        ),
        Property(
            "shutdown_timeout",
            "int",
            _with_template("shutdown_timeout", _constant(60)),
            classes=VM_CLASSES,
            check=_positive("shutdown_timeout"),
        ),
        Property(
            "default_dispvm",
            "vm",
            _global("default_dispvm"),
            check=_disposable_template("default_dispvm"),
        ),
        Property(
            "management_dispvm",
            "vm",
            _with_template("management_dispvm", _global("management_dispvm")),
            check=_disposable_template("management_dispvm"),
        ),
        Property(
            "template_for_dispvms",
            "bool",
            _constant(False),
            classes=frozenset({"AppVM", "StandaloneVM"}),
        ),
        Property("guivm", "vm", _global("default_guivm"), classes=VM_CLASSES),
        Property("audiovm", "vm", _global("default_audiovm"), classes=VM_CLASSES),
    )
}

# The global properties (qubes-prefs) that qube defaults come from.
GLOBAL_DEFAULTS = {
    "default_netvm": None,
    "default_template": None,
    "default_dispvm": None,
    "management_dispvm": None,
    "default_guivm": ADMIN_VM,
    "default_audiovm": ADMIN_VM,
    "default_kernel": platform.release(),
}
