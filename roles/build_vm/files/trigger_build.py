# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""qubesbuilder.TriggerBuild+COMPONENT: start the build of a component GitHub reported a push of.

Run by /usr/local/etc/qubes-rpc/qubesbuilder.TriggerBuild in a build qube; dom0 lets the net
qube call it. The argument is the only input (stdin is not read) and is hostile: exactly one,
1 to 64 characters of [A-Za-z0-9_-] (builder-github forbids '/', '.' and space; qrexec already
turned other characters into '_'). Every builder of builders.list that knows the component,
by name or by its repository's short name, gets the build, detached: the call returns at once,
builds of one builder wait for each other on its lock, builders run side by side. Every decision
is a line of ~/builder-github-logs/<epoch>-<pid>.log and each build's output goes to
<same>-<component>-<release>.log; only the exit code goes back to the caller.
"""

from __future__ import annotations

import sys

from builder_actions import build_steps
from builder_instances import (
    COMPONENT,
    ServiceLog,
    action_environment,
    caller,
    find_component,
    ignore_input,
    load_config,
    printable,
    read_builders,
    start_detached,
)


def argument(argv: list[str]) -> str:
    """The component argument, or ValueError naming the rule it breaks."""
    if len(argv) != 2:
        raise ValueError(f"expected exactly one argument, got {len(argv) - 1}")
    value = argv[1]
    if not 1 <= len(value) <= 64:
        raise ValueError(f"component name of {len(value)} characters (1 to 64)")
    if not COMPONENT.match(value):
        raise ValueError(
            f"component name {printable(value)!r} has a character outside [A-Za-z0-9_-]"
        )
    return value


def main(argv: list[str]) -> int:
    ignore_input()
    config = load_config()
    log = ServiceLog(config["logs_directory"], "qubesbuilder.TriggerBuild")
    source = caller(config, log)
    if source is None:
        return 1
    try:
        wanted = argument(argv)
    except ValueError as error:
        log.line(f"refused from {source}: malformed argument: {error}")
        return 1
    started = 0
    for builder in read_builders(config["builders_list"]):
        component = find_component(builder, wanted, float(config["query_timeout"]))
        if component is None:
            continue
        output = log.action_log(component, builder.release)
        steps = build_steps(builder, component)
        pid = start_detached(builder, steps, output, action_environment(config))
        log.line(
            f"from {source}: build of {component} started in {builder.directory}"
            f" (release {builder.release}, process {pid}, log {output})"
        )
        started += 1
    if not started:
        log.line(f"from {source}: no builder knows {wanted}: nothing to build")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
