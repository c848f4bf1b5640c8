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
from typing import Any

from qubesim.errors import NoSuchQube, QubesimError, UsageError
from qubesim.layout import Layout
from qubesim.names import LABELS, validate_label
from qubesim.properties import (
    ADMIN_VM,
    GLOBAL_DEFAULTS,
    PROPERTIES,
    VM_CLASSES,
    Property,
    RefusedValue,
)
from qubesim.release import stored

GiB = 1024**3

_DEFAULT_VOLUMES = {"root": 20 * GiB, "private": 2 * GiB, "volatile": 10 * GiB, "kernel": 0}
# qubes/__init__.py property.bool: the words a boolean property takes, in any case
_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})
# qubes/app.py: the qube references that name a qube whose lifetime they hold
REFERENCES = ("template", "netvm", "default_dispvm", "management_dispvm", "guivm", "audiovm")


class State:
    """The database content, with the rules that keep it consistent.

    `is_running` tells which qubes run: qubesd's rules depend on it (no template change while a
    qube runs, no running qube onto a halted netvm). Without a runtime, nothing runs.
    """

    def __init__(
        self, data: dict[str, Any], is_running: Callable[[str], bool] | None = None
    ) -> None:
        self.qubes: dict[str, dict[str, Any]] = data.setdefault("qubes", {})
        self.defaults: dict[str, Any] = data.setdefault("defaults", {})
        self.data = data
        self.is_running: Callable[[str], bool] = is_running or (lambda _name: False)

    # -- lookup -----------------------------------------------------------------------------------
    def qube(self, name: str) -> dict[str, Any]:
        try:
            return self.qubes[name]
        except KeyError:
            raise NoSuchQube(name) from None

    def names(self) -> list[str]:
        return sorted(self.qubes)

    @property
    def release(self) -> str:
        """The Qubes release the host simulates (qubesim/release.py)."""
        return stored(self.data)

    def global_default(self, key: str) -> Any:
        return self.defaults.get(key, GLOBAL_DEFAULTS.get(key))

    def has_property(self, name: str, prop: str) -> bool:
        spec = PROPERTIES.get(prop)
        if spec is None:
            return False
        return spec.classes is None or self.qube(name)["klass"] in spec.classes

    def _spec(self, name: str, prop: str) -> Property:
        if not self.has_property(name, prop):
            raise UsageError(f"no such property: {prop!r}")
        return PROPERTIES[prop]

    def is_default(self, name: str, prop: str) -> bool:
        spec = self._spec(name, prop)
        return not spec.always_set and prop not in self.qube(name)["properties"]

    def get_property(self, name: str, prop: str) -> Any:
        spec = self._spec(name, prop)
        explicit = self.qube(name)["properties"]
        if spec.writable and prop in explicit:
            return explicit[prop]
        return spec.default(self, name)

    def _flag(self, name: str, prop: str) -> bool:
        return self.has_property(name, prop) and bool(self.get_property(name, prop))

    def provides_network(self, name: str) -> bool:
        return self._flag(name, "provides_network")

    def is_disposable_template(self, name: str) -> bool:
        return self._flag(name, "template_for_dispvms")

    def is_networked(self, name: str) -> bool:
        """qubes/vm/mix/net.py is_networked: it gives network, or it has a netvm."""
        return self.provides_network(name) or self.get_property(name, "netvm") is not None

    def network_isolated(self, name: str) -> bool:
        """No netvm and no network of its own (sys-net has one): the qube sees only loopback."""
        return not self.is_networked(name)

    def clients(self, netvm: str) -> list[str]:
        """The qubes whose netvm is `netvm` (running or not)."""
        return [
            name
            for name in self.names()
            if self.has_property(name, "netvm") and self.get_property(name, "netvm") == netvm
        ]

    def connected_to(self, netvm: str) -> set[str]:
        """Every qube that reaches the network through `netvm`, directly or not."""
        found: set[str] = set()
        pending = [netvm]
        while pending:
            for client in self.clients(pending.pop()):
                if client not in found:
                    found.add(client)
                    pending.append(client)
        return found

    # -- changes ----------------------------------------------------------------------------------
    def set_property(self, name: str, prop: str, text: str) -> None:
        """Set a property as qubesd does: a refused value raises, and the old one stays."""
        spec = self._spec(name, prop)
        if not spec.writable:
            raise QubesimError(f"property {prop!r} is read-only")
        value = self._parse(name, spec, text)
        if spec.check is not None:
            value = spec.check(self, name, value)
        self.qube(name)["properties"][prop] = value

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
                raise RefusedValue(f"Invalid literal for boolean property: {text!r}")
            return lowered in _TRUE
        if spec.kind == "int":
            try:
                return int(text)
            except ValueError:
                message = f"invalid value for {spec.name}: {text!r} (expected an integer)"
                raise QubesimError(message) from None
        if spec.kind == "label":
            if text not in LABELS:
                raise RefusedValue(f"Label does not exist: {text}")
            return text
        if spec.kind == "vm":
            return self._parse_vm(spec, text)
        return text

    def _parse_vm(self, spec: Property, text: str) -> str | None:
        """qubes/vm/__init__.py VMProperty.__set__; "none" is qvm-prefs' word for empty."""
        if text in ("", "none", "None"):
            return None
        if text not in self.qubes:
            raise RefusedValue(f"Can't set {spec.name} to non-existing qube {text}")
        if text == ADMIN_VM and spec.name not in ("guivm", "audiovm"):
            raise RefusedValue(
                f"wrong VM class: domains[{text!r}] is of type AdminVM and not QubesVM"
            )
        return text

    def add_qube(self, name: str, klass: str, label: str, template: str | None) -> dict[str, Any]:
        if name in self.qubes:
            raise QubesimError(f"VM {name!r} already exists")
        if klass not in VM_CLASSES:
            raise UsageError(f"no such domain class: {klass!r}")
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
        if klass in ("AppVM", "DispVM"):
            try:
                self.set_property(name, "template", template or self._default_template(klass))
            except QubesimError:
                del self.qubes[name]
                raise
        return record

    def _default_template(self, klass: str) -> str:
        key = "default_dispvm" if klass == "DispVM" else "default_template"
        default = self.global_default(key)
        if not default:
            raise RefusedValue(f"{klass} needs a template, and {key} is not set")
        return default

    def dependents(self, name: str) -> list[str]:
        """Where `name` is referred to (it cannot be removed while it is), as (holder, property):
        the holder is None for a global property."""
        users: list[tuple[str | None, str]] = []
        for other in self.names():
            for prop in REFERENCES:
                if (
                    other != name
                    and self.has_property(other, prop)
                    and self.get_property(other, prop) == name
                ):
                    users.append((other, prop))
        users.extend((None, key) for key, value in self.defaults.items() if value == name)
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
        "defaults": dict(GLOBAL_DEFAULTS),
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

    def read(self, is_running: Callable[[str], bool] | None = None) -> State:
        with self._locked(fcntl.LOCK_SH):
            return State(json.loads(self.layout.database.read_text()), is_running)

    @contextmanager
    def transaction(self, is_running: Callable[[str], bool] | None = None) -> Iterator[State]:
        """Yield the state for changes; it is written back only if the block succeeds."""
        with self._locked(fcntl.LOCK_EX):
            state = State(json.loads(self.layout.database.read_text()), is_running)
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


__all__ = ["ADMIN_VM", "LABELS", "PROPERTIES", "Database", "State"]
