"""The naming rules of real Qubes, for qubes and labels."""

from __future__ import annotations

import re

from qubesim.errors import UsageError

NAME_MAX_LENGTH = 31
_NAME_PATTERN = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]*")
# Names that the Qubes admin API reserves for itself (property values and keywords).
_RESERVED_NAMES = frozenset({"none", "default", "dom0"})

LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")


def validate_qube_name(name: str) -> str:
    """Return `name` if a new qube may be called so, else raise a UsageError naming the rule."""
    if not name:
        raise UsageError("VM name must not be empty")
    if len(name) > NAME_MAX_LENGTH:
        raise UsageError(f"VM name must be shorter than {NAME_MAX_LENGTH + 1} characters: {name!r}")
    if not _NAME_PATTERN.fullmatch(name):
        raise UsageError(
            f"VM name contains illegal characters: {name!r}"
            " (must start with a letter and contain only letters, digits, '_' and '-')"
        )
    if name.endswith("-dm"):
        raise UsageError(f"VM name cannot end with -dm: {name!r}")
    if name in _RESERVED_NAMES:
        raise UsageError(f"VM name {name!r} is reserved")
    return name


def validate_label(label: str) -> str:
    if label not in LABELS:
        raise UsageError(f"no such label: {label!r} (one of {', '.join(LABELS)})")
    return label
