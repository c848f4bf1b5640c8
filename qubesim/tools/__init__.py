"""dom0's qvm tools. Each tool is a module here with `main(argv) -> int`; a shim named after the
tool dispatches on its own name, as the real tools are separate commands."""

from __future__ import annotations

import importlib
import os
import sys

TOOL_NAMES = (
    "qrexec-policy-exec",
    "qubes-policy-lint",
    "qvm-check",
    "qvm-create",
    "qvm-features",
    "qvm-kill",
    "qvm-ls",
    "qvm-prefs",
    "qvm-remove",
    "qvm-run",
    "qvm-service",
    "qvm-shutdown",
    "qvm-start",
    "qvm-tags",
    "qvm-volume",
)


def main() -> int:
    name = os.path.basename(sys.argv[0])
    if name not in TOOL_NAMES:
        print(f"qubesim: unknown tool {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"qubesim.tools.{name.replace('-', '_')}")
    return module.main(sys.argv[1:])
