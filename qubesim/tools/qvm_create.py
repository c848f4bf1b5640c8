"""qvm-create: create a qube (qubesadmin/tools/qvm_create.py).

The qube is created first (tagged created-by-dom0, as qubesd's admin.vm.Create does), then each
--property is set: one that is refused leaves the qube created, and the exit code is 2.
"""

from __future__ import annotations

import argparse

from qubesim import template
from qubesim.errors import QubesimError, UsageError
from qubesim.names import LABELS, validate_qube_name
from qubesim.properties import OWN_ROOT, VM_CLASSES
from qubesim.tools.common import Context, log, parser, run

POOL = "varlibqubes"  # the one storage pool qubesim has


def _pairs(pairs: list[str], what: str) -> list[tuple[str, str]]:
    result = []
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise UsageError(f"{what} takes NAME=VALUE, not {pair!r}")
        result.append((key, value))
    return result


def _pools(arguments: argparse.Namespace) -> dict[str, str]:
    pools = {}
    for pair in arguments.pool:
        fields = pair.split("=")
        if len(fields) != 2:
            raise UsageError("Pool argument must be of form: -p volume_name=pool_name")
        pools[fields[0]] = fields[1]
    return pools


def _klass(arguments: argparse.Namespace) -> tuple[str, str | None]:
    """The class and label, after --disp (DispVM, red by default) and --standalone."""
    klass, label = arguments.cls, arguments.label
    if arguments.disp:
        klass, label = "DispVM", label or "red"
    if arguments.standalone:
        klass = "StandaloneVM"
    return klass, label


def _check_storage(klass: str, pools: dict[str, str], one_pool: str) -> None:
    volumes = ("private", "volatile", "kernel") + (("root",) if klass in OWN_ROOT else ())
    for volume, pool in [*pools.items(), *([("root", one_pool)] if one_pool else [])]:
        if pool != POOL:
            raise QubesimError(f"Invalid pool: {pool!r} (qubesim has {POOL!r} only)")
        if volume not in volumes:
            raise QubesimError(f"No such volume: {volume!r}")


def _create(context: Context, arguments: argparse.Namespace, klass: str, label: str) -> None:
    name = validate_qube_name(arguments.VMNAME)
    pools = _pools(arguments)
    with context.transaction() as state:
        _check_storage(klass, pools, arguments.one_pool)
        template_name = arguments.template if klass != "StandaloneVM" else None
        source = arguments.template if klass == "StandaloneVM" else None
        if source is not None and state.qube(source)["klass"] != "TemplateVM":
            raise QubesimError(f"{source} is not a template")
        state.add_qube(name, klass, label, template_name)["tags"].append("created-by-dom0")
        release = state.release
    if klass in OWN_ROOT:
        # Qubes copies the template's root into a StandaloneVM made from one.
        template.prepare(context.layout, name, release, copy_of=source)


def _body(context: Context, arguments: argparse.Namespace) -> int:
    if arguments.help_classes:
        print("\n".join(sorted(VM_CLASSES)))
        return 0
    klass, label = _klass(arguments)
    properties = _pairs(arguments.properties, "--property")
    if label is None:
        raise UsageError("--label option is mandatory")
    if arguments.VMNAME is None:
        raise UsageError("VMNAME is mandatory")
    if label not in LABELS:
        raise UsageError(f"no such label: {label!r}; available: {', '.join(LABELS)}")
    if klass not in VM_CLASSES:
        raise UsageError(f"no such domain class: {klass!r}")
    try:
        _create(context, arguments, klass, label)
    except UsageError:
        raise
    except QubesimError as error:
        log("app", f"Error creating VM: {error}")
        return 1
    code = 0
    for key, value in properties:
        try:
            with context.transaction() as state:
                state.set_property(arguments.VMNAME, key, value)
        except QubesimError as error:
            log("app", f"Error setting property {key} (but VM created): {error}")
            code = 2
    return code


def main(argv: list[str]) -> int:
    tool = parser("qvm-create", "Create a new qube.")
    tool.add_argument("--class", "-C", dest="cls", default="AppVM", help="the qube's class")
    tool.add_argument("--standalone", action="store_true", help="same as --class StandaloneVM")
    tool.add_argument("--disp", action="store_true", help="same as --class DispVM --label red")
    tool.add_argument(
        "--property",
        "--prop",
        dest="properties",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set a property once the qube exists (may be repeated)",
    )
    tool.add_argument(
        "--pool",
        "-p",
        action="append",
        default=[],
        metavar="VOLUME_NAME=POOL_NAME",
        help="the pool of a volume",
    )
    tool.add_argument(
        "-P", dest="one_pool", default="", metavar="POOL_NAME", help="every volume's pool"
    )
    tool.add_argument("--template", "-t", help="the template (default: default_template)")
    tool.add_argument("--label", "-l", help="the qube's label (mandatory)")
    tool.add_argument("--help-classes", action="store_true", help="list the classes and exit")
    tool.add_argument("VMNAME", nargs="?", help="the new qube's name")
    return run(tool, argv, _body)
