"""qvm-create: create a qube (an AppVM on a template, or a TemplateVM from the host's root)."""

from __future__ import annotations

import argparse

from qubesim import template
from qubesim.errors import UsageError
from qubesim.names import validate_qube_name
from qubesim.tools.common import Context, parser, run


def _properties(pairs: list[str]) -> list[tuple[str, str]]:
    result = []
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise UsageError(f"--property takes NAME=VALUE, not {pair!r}")
        result.append((key, value))
    return result


def _body(context: Context, arguments: argparse.Namespace) -> None:
    name = validate_qube_name(arguments.VMNAME)
    if arguments.label is None:
        raise UsageError("--label option is mandatory")
    properties = _properties(arguments.properties)
    with context.database.transaction() as state:
        state.add_qube(name, arguments.cls, arguments.label, arguments.template)
        for key, value in properties:
            state.set_property(name, key, value)
    if arguments.cls == "TemplateVM":
        template.prepare(context.layout, name)


def main(argv: list[str]) -> int:
    tool = parser("qvm-create", "Create a new qube.")
    tool.add_argument(
        "--class",
        "-C",
        dest="cls",
        default="AppVM",
        help="the qube's class: AppVM (default) or TemplateVM",
    )
    tool.add_argument("--template", "-t", help="the AppVM's template (default: default_template)")
    tool.add_argument("--label", "-l", help="the qube's label (mandatory)")
    tool.add_argument(
        "--property",
        "--prop",
        "-p",
        dest="properties",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a property (may be repeated)",
    )
    tool.add_argument("VMNAME", help="the new qube's name")
    return run(tool, argv, _body)
