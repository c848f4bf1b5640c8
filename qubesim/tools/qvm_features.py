"""qvm-features: list, get, set or unset a qube's features (free-form key/value pairs)."""

from __future__ import annotations

import argparse

from qubesim.errors import UsageError
from qubesim.tools.common import Context, parser, run


def _body(context: Context, arguments: argparse.Namespace) -> int:
    name = arguments.VMNAME
    context.state().qube(name)
    if arguments.feature is None:
        if arguments.unset:
            raise UsageError("--unset needs a feature name")
        features = context.state().qube(name)["features"]
        width = max(map(len, features), default=0)
        for key in sorted(features):
            print(f"{key.ljust(width)}  {features[key]}".rstrip())
        return 0
    if arguments.unset:
        if arguments.value is not None:
            raise UsageError("--unset takes no value")
        with context.database.transaction() as state:
            state.qube(name)["features"].pop(arguments.feature, None)
        return 0
    if arguments.value is None:
        features = context.state().qube(name)["features"]
        if arguments.feature not in features:
            return 1  # silently, as upstream (qubesadmin/tools/qvm_features.py main)
        print(features[arguments.feature])
        return 0
    with context.database.transaction() as state:
        state.qube(name)["features"][arguments.feature] = arguments.value
    return 0


def main(argv: list[str]) -> int:
    tool = parser("qvm-features", "List, get, set or unset qube features.")
    tool.add_argument(
        "--unset", "--default", "--delete", "-D", action="store_true", help="remove the feature"
    )
    tool.add_argument("VMNAME")
    tool.add_argument("feature", nargs="?", metavar="FEATURE")
    tool.add_argument("value", nargs="?", metavar="VALUE")
    return run(tool, argv, _body)
