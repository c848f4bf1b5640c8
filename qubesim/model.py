"""The qubes database: what qubes exist and their properties, tags, features and volumes.

It is one JSON file under $QUBESIM_HOME, read under a shared lock and rewritten atomically under an
exclusive one, so that many qvm tools (Ansible forks) can run at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from qubesim.errors import NoSuchQube, QubesimError, UsageError
from qubesim.layout import Layout
from qubesim.names import LABELS, validate_label

ADMIN_VM = "dom0"
QUBE_CLASSES = ("AppVM", "TemplateVM")
GiB = 1024**3

_DEFAULT_VOLUMES = {"root": 20 * GiB, "private": 2 * GiB, "volatile": 10 * GiB, "kernel": 0}


@dataclass(frozen=True)
class Property:
    """One qvm-prefs property: its type, its default, and whether qvm-prefs may set it."""

    name: str
    kind: str  # str | int | bool | label | vm
    default: Callable[[State, str], Any]
    writable: bool = True
    required_class: str | None = None  # "AppVM" for template: only AppVMs have one
    vm_only: bool = False  # a property of qubes, which dom0 (the AdminVM) does not have
    vm_check: Callable[[State, str], str | None] | None = None  # message when a qube is unfit


def _no_default(_state: State, _name: str) -> None:
    return None


def _default_netvm(state: State, name: str) -> str | None:
    record = state.qubes[name]
    if record["klass"] == "TemplateVM" or state.get_property(name, "provides_network"):
        return None
    default = state.defaults.get("default_netvm")
    return default if default != name else None


def _must_provide_network(state: State, name: str) -> str | None:
    if not state.get_property(name, "provides_network"):
        return f"VM {name!r} does not provide network"
    return None


def _must_be_template(state: State, name: str) -> str | None:
    if state.qubes[name]["klass"] != "TemplateVM":
        return f"VM {name!r} is not a TemplateVM"
    return None


def _must_be_dispvm_template(state: State, name: str) -> str | None:
    if not state.get_property(name, "template_for_dispvms"):
        return f"VM {name!r} is not a disposable template (template_for_dispvms is False)"
    return None


def _constant(value: Any) -> Callable[[State, str], Any]:
    return lambda _state, _name: value


PROPERTIES: dict[str, Property] = {
    prop.name: prop
    for prop in (
        Property("name", "str", lambda _s, name: name, writable=False),
        Property("klass", "str", lambda s, name: s.qubes[name]["klass"], writable=False),
        Property("uuid", "str", lambda s, name: s.qubes[name]["uuid"], writable=False),
        Property("qid", "int", lambda s, name: s.qubes[name]["qid"], writable=False),
        Property("label", "label", _no_default),
        Property("template", "vm", _no_default, required_class="AppVM", vm_check=_must_be_template),
        Property("netvm", "vm", _default_netvm, vm_only=True, vm_check=_must_provide_network),
        Property("provides_network", "bool", _constant(False), vm_only=True),
        Property("memory", "int", _constant(400), vm_only=True),
        Property("maxmem", "int", _constant(4000), vm_only=True),
        Property("vcpus", "int", _constant(2), vm_only=True),
        Property(
            "default_dispvm",
            "vm",
            lambda s, _name: s.defaults.get("default_dispvm"),
            vm_check=_must_be_dispvm_template,
        ),
        Property("template_for_dispvms", "bool", _constant(False), vm_only=True),
        Property("default_user", "str", _constant("user"), vm_only=True),
        Property("qrexec_timeout", "int", _constant(60), vm_only=True),
    )
}

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


class State:
    """The database content, with the rules that keep it consistent."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.qubes: dict[str, dict[str, Any]] = data.setdefault("qubes", {})
        self.defaults: dict[str, Any] = data.setdefault("defaults", {})
        self.data = data

    # -- lookup -----------------------------------------------------------------------------------
    def qube(self, name: str) -> dict[str, Any]:
        try:
            return self.qubes[name]
        except KeyError:
            raise NoSuchQube(name) from None

    def names(self) -> list[str]:
        return sorted(self.qubes)

    def has_property(self, name: str, prop: str) -> bool:
        spec = PROPERTIES.get(prop)
        if spec is None:
            return False
        klass = self.qube(name)["klass"]
        if spec.vm_only and klass == "AdminVM":
            return False
        return spec.required_class in (None, klass)

    def _spec(self, name: str, prop: str) -> Property:
        if not self.has_property(name, prop):
            raise UsageError(f"no such property: {prop!r}")
        return PROPERTIES[prop]

    def is_default(self, name: str, prop: str) -> bool:
        spec = self._spec(name, prop)
        return spec.writable and prop not in self.qube(name)["properties"]

    def get_property(self, name: str, prop: str) -> Any:
        spec = self._spec(name, prop)
        explicit = self.qube(name)["properties"]
        if spec.writable and prop in explicit:
            return explicit[prop]
        return spec.default(self, name)

    def network_isolated(self, name: str) -> bool:
        """No netvm and no network of its own (sys-net has one): the qube sees only loopback."""
        return self.get_property(name, "netvm") is None and not self.get_property(
            name, "provides_network"
        )

    # -- changes ----------------------------------------------------------------------------------
    def set_property(self, name: str, prop: str, text: str) -> None:
        spec = self._spec(name, prop)
        if not spec.writable:
            raise QubesimError(f"property {prop!r} is read-only")
        self.qube(name)["properties"][prop] = self._parse(name, spec, text)

    def reset_property(self, name: str, prop: str) -> None:
        spec = self._spec(name, prop)
        if not spec.writable:
            raise QubesimError(f"property {prop!r} is read-only")
        if spec.name in ("label", "template"):
            raise QubesimError(f"property {prop!r} has no default")
        self.qube(name)["properties"].pop(prop, None)

    def _parse(self, name: str, spec: Property, text: str) -> Any:
        if spec.kind == "bool":
            lowered = text.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise QubesimError(
                    f"invalid value for {spec.name}: {text!r} (expected True or False)"
                )
            return lowered in _TRUE
        if spec.kind == "int":
            try:
                number = int(text)
            except ValueError:
                message = f"invalid value for {spec.name}: {text!r} (expected an integer)"
                raise QubesimError(message) from None
            if number < 0:
                raise QubesimError(f"invalid value for {spec.name}: {text!r} (must be >= 0)")
            return number
        if spec.kind == "label":
            return validate_label(text)
        if spec.kind == "vm":
            return self._parse_vm(name, spec, text)
        return text

    def _parse_vm(self, name: str, spec: Property, text: str) -> str | None:
        if text in ("", "none", "None"):
            if spec.name == "template":
                raise QubesimError("property 'template' cannot be empty")
            return None
        if text not in self.qubes or text == ADMIN_VM:
            raise QubesimError(f"invalid value for {spec.name}: no such domain: {text!r}")
        if text == name:
            raise QubesimError(f"invalid value for {spec.name}: a VM cannot refer to itself")
        problem = spec.vm_check(self, text) if spec.vm_check else None
        if problem:
            raise QubesimError(f"invalid value for {spec.name}: {problem}")
        return text

    def add_qube(self, name: str, klass: str, label: str, template: str | None) -> dict[str, Any]:
        if name in self.qubes:
            raise QubesimError(f"VM {name!r} already exists")
        if klass not in QUBE_CLASSES:
            raise UsageError(f"unsupported class: {klass!r} (one of {', '.join(QUBE_CLASSES)})")
        validate_label(label)
        qids = [record["qid"] for record in self.qubes.values()]
        record: dict[str, Any] = {
            "klass": klass,
            "uuid": str(uuid.uuid4()),
            "qid": max(qids, default=0) + 1,
            "properties": {"label": label},
            "tags": [],
            "features": {},
            "volumes": dict(_DEFAULT_VOLUMES),
        }
        self.qubes[name] = record
        if klass == "AppVM":
            try:
                self.set_property(name, "template", template or self.defaults["default_template"])
            except (QubesimError, KeyError):
                del self.qubes[name]
                raise
        return record

    def dependents(self, name: str) -> list[str]:
        """Qubes whose properties name `name` (it cannot be removed while they do)."""
        users = []
        for other in self.names():
            for prop in ("template", "netvm", "default_dispvm"):
                if (
                    other != name
                    and self.has_property(other, prop)
                    and self.get_property(other, prop) == name
                ):
                    users.append(f"{other} ({prop})")
        users.extend(f"global {key}" for key, value in self.defaults.items() if value == name)
        return users


def initial_state() -> dict[str, Any]:
    dom0 = {
        "klass": "AdminVM",
        "uuid": "00000000-0000-0000-0000-000000000000",
        "qid": 0,
        "properties": {"label": "black"},
        "tags": [],
        "features": {},
        "volumes": {},
    }
    return {
        "qubes": {ADMIN_VM: dom0},
        "defaults": {"default_netvm": None, "default_template": None, "default_dispvm": None},
    }


class Database:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def exists(self) -> bool:
        return self.layout.database.exists()

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        if not self.exists():
            raise QubesimError(
                f"no simulated Qubes host at {self.layout.home}: run 'qubesim init' first"
            )
        with open(self.layout.database_lock, "a") as lock:
            fcntl.flock(lock, mode)
            yield

    def read(self) -> State:
        with self._locked(fcntl.LOCK_SH):
            return State(json.loads(self.layout.database.read_text()))

    @contextmanager
    def transaction(self) -> Iterator[State]:
        """Yield the state for changes; it is written back only if the block succeeds."""
        with self._locked(fcntl.LOCK_EX):
            state = State(json.loads(self.layout.database.read_text()))
            yield state
            self._write(state.data)

    def create(self) -> None:
        self.layout.home.mkdir(parents=True, exist_ok=True)
        if not self.exists():
            self._write(initial_state())

    def _write(self, data: dict[str, Any]) -> None:
        temporary = self.layout.database.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(temporary, self.layout.database)


def format_value(value: Any) -> str:
    """How qvm tools print a property value: None as an empty string, booleans as True/False."""
    if value is None:
        return ""
    return str(value)


__all__ = ["ADMIN_VM", "LABELS", "PROPERTIES", "Database", "State", "format_value"]
