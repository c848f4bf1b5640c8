# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every service of the package checks the same way: a qube name, a component name,
text from outside made printable, and the settings file a role wrote.

A qube name follows Qubes' own rule (qubes-core-admin, qubes.vm.validate_name): a letter, then
letters, digits, '_', '.' or '-', at most 31 characters, neither 'none', 'default' nor
'Domain-0', and not ending in '-dm' (the name of a qube's device model stub domain).

A component name is what qubes-builder-github's TriggerBuild accepts (1 to 64 of
[A-Za-z0-9_-]) without a leading '-', which a program given it as an argument would read as an
option.

Every check is a full match: a pattern ending in `$` would let a trailing newline through.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

QUBE_NAME_MAX = 31
_QUBE_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]*")
_QUBE_NAME_RESERVED = frozenset({"none", "default", "Domain-0"})
QUBE_NAME_RULE = (
    "a letter, then letters, digits, '_', '.' or '-', at most 31 characters, not 'none',"
    " 'default' nor 'Domain-0', not ending in '-dm'"
)

COMPONENT_MAX = 64
_COMPONENT_CHARACTERS = re.compile(r"[A-Za-z0-9_-]+")
COMPONENT_RULE = "1 to 64 of [A-Za-z0-9_-], not starting with '-'"

# What printable() keeps of text from outside by default: one log line's worth.
PRINTABLE_LIMIT = 300
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_NOT_PRINTABLE_OR_NEWLINE = re.compile(r"[^\x20-\x7e\n]")


def qube_name_problem(value: object) -> str | None:
    """Why value is not a qube name, or None if it is one."""
    if not isinstance(value, str):
        return f"a qube name is text, not {type(value).__name__}"
    shown = printable(value, 40)
    if not 1 <= len(value) <= QUBE_NAME_MAX:
        return f"qube name {shown!r} has {len(value)} characters (1 to {QUBE_NAME_MAX})"
    if not _QUBE_NAME.fullmatch(value):
        return f"qube name {shown!r} breaks the rule: {QUBE_NAME_RULE}"
    if value in _QUBE_NAME_RESERVED or value.endswith("-dm"):
        return f"{shown!r} is a name Qubes keeps for itself: {QUBE_NAME_RULE}"
    return None


def is_qube_name(value: object) -> bool:
    return qube_name_problem(value) is None


def component_problem(value: object) -> str | None:
    """Why value is not a component name, or None if it is one."""
    if not isinstance(value, str):
        return f"a component name is text, not {type(value).__name__}"
    if not 1 <= len(value) <= COMPONENT_MAX:
        return f"component name of {len(value)} characters (1 to {COMPONENT_MAX})"
    shown = printable(value, COMPONENT_MAX)
    if not _COMPONENT_CHARACTERS.fullmatch(value):
        return f"component name {shown!r} has a character outside [A-Za-z0-9_-]"
    if value.startswith("-"):
        return f"component name {shown!r} starts with '-'"
    return None


def is_component(value: object) -> bool:
    return component_problem(value) is None


def printable(
    text: str, limit: int = PRINTABLE_LIMIT, *, newlines: bool = False, last: bool = False
) -> str:
    """Text from outside (arguments, tool output) made safe to log: every character but
    printable ASCII becomes '?' (newlines too, unless kept), bounded to limit characters, the
    first ones or, for error output whose end says most, the last ones (stripped)."""
    # Cut first (each character is replaced by one): the work is bounded by limit, not by text.
    kept = text[-limit:] if last else text[:limit]
    shown = (_NOT_PRINTABLE_OR_NEWLINE if newlines else _NOT_PRINTABLE).sub("?", kept)
    return shown.strip() if last else shown


def settings_path(variable: str, default: str) -> str:
    """The settings file the environment variable names (the role's service sets it to where the
    role wrote them; tests name their own), else the default place."""
    return os.environ.get(variable) or default


def load_settings(path: str, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object in path over the defaults. Without defaults the file must exist; with
    them a missing file means the defaults. Anything but a JSON object is refused, naming the
    file."""
    settings = dict(defaults or {})
    try:
        with open(path, encoding="utf-8") as stored:
            loaded = json.load(stored)
    except FileNotFoundError:
        if defaults is None:
            raise
        return settings
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the settings are a JSON object, not {type(loaded).__name__}")
    settings.update(loaded)
    return settings
