"""Making and unmaking the simulated host: dom0, the host's template and the service qubes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from qubesim import daemon, dom0, ports, template, world
from qubesim.errors import QubesimError
from qubesim.layout import Layout
from qubesim.model import Database, State
from qubesim.runtime import Runtime
from qubesim.tools import TOOL_NAMES

# Qubes' own policy for what qubesim models of it (qubes-core-admin, qubes-rpc-policy/
# 90-default.policy): templates download packages through the updates proxy of sys-net.
DEFAULT_POLICY = Path("/etc/qubes/policy.d/90-default.policy")
DEFAULT_POLICY_RULES = """\
## Default policy of a Qubes installation (the part that qubesim models).

qubes.UpdatesProxy      *   @type:TemplateVM        @default    allow target=sys-net
qubes.UpdatesProxy      *   @anyvm                  @anyvm      deny
"""

# The service qubes of a default Qubes installation: name, label, netvm.
SERVICE_QUBES = (
    ("sys-net", "red", None),
    ("sys-firewall", "green", "sys-net"),
    ("sys-whonix", "black", "sys-firewall"),
)


# What the host's qubes listen on in this machine's loopback (qubes with a netvm share its network):
# sys-net's updates proxy, a tinyproxy (qubesim/guest/tinyproxy-updates.conf).
QUBE_PORTS = ((8082, "sys-net's updates proxy"),)


def require_root() -> None:
    if os.geteuid() != 0:
        raise QubesimError("qubesim needs root: it makes namespaces and mounts (run it with sudo)")


def initialise(layout: Layout) -> list[str]:
    """Create whatever of the simulated host is missing; return what was created."""
    require_root()
    check_qube_ports(layout)
    template.check_host_programs()
    layout.create()
    dom0.ensure_in_dom0(layout)
    database = Database(layout)
    database.create()
    _write_tool_shims(layout)
    if not DEFAULT_POLICY.exists():
        DEFAULT_POLICY.write_text(DEFAULT_POLICY_RULES)
    template_name = template.host_template_name()
    created = []
    with database.transaction() as state:
        if template_name not in state.qubes:
            state.add_qube(template_name, "TemplateVM", "black", None)
            created.append(template_name)
        state.defaults["default_template"] = state.defaults["default_template"] or template_name
    template.prepare(layout, template_name)
    runtime = Runtime(layout)
    if not runtime.is_running(template_name):  # its AppVMs see the refreshed tools
        runtime.commit_template(template_name)
    # The qrexec daemon runs the code installed now; running qubes reconnect to it on their own.
    daemon.stop_singleton(layout, daemon.QREXEC)
    daemon.ensure_qrexec(layout)
    with database.transaction() as state:
        created.extend(_add_service_qubes(state, template_name))
        state.defaults["default_netvm"] = state.defaults["default_netvm"] or "sys-firewall"
    return created


def check_qube_ports(layout: Layout) -> None:
    """Refuse while a program other than this host's own qubes (another simulated host's sys-net,
    a proxy of this machine) holds a port the qubes need: templates would download through it."""
    namespaces: set[int | None] = set()
    if Database(layout).exists():
        runtime = Runtime(layout)
        for name in Database(layout).read().names():
            running = runtime.running(name)
            if running is not None:
                namespaces.add(ports.pid_namespace(running.pid))
    namespaces.discard(None)
    for port, needed_by in QUBE_PORTS:
        ports.require(port, needed_by, lambda holder: ports.pid_namespace(holder.pid) in namespaces)


def _add_service_qubes(state: State, template_name: str) -> list[str]:
    created = []
    for name, label, netvm in SERVICE_QUBES:
        if name not in state.qubes:
            state.add_qube(name, "AppVM", label, template_name)
            state.set_property(name, "provides_network", "True")
            state.set_property(name, "netvm", netvm or "")
            created.append(name)
    return created


def _write_tool_shims(layout: Layout) -> None:
    """dom0's qvm tools: small scripts bound to this Python, put on PATH inside `qubesim dom0`."""
    shim = f"#!{sys.executable}\nimport sys\nfrom qubesim.tools import main\nsys.exit(main())\n"
    for name in TOOL_NAMES:
        path = layout.dom0_bin / name
        if not path.exists() or path.read_text() != shim:
            path.write_text(shim)
        path.chmod(0o755)


def destroy(layout: Layout) -> bool:
    """Stop every qube and remove everything under $QUBESIM_HOME; False when there was nothing."""
    require_root()
    if not layout.home.exists():
        return False
    holder = dom0.holder_pid(layout)
    if holder is not None:
        dom0.ensure_in_dom0(layout)
    database = Database(layout)
    if database.exists():
        runtime = Runtime(layout)
        state = database.read()
        for name in state.names():
            runtime.kill(name)
        for name in state.names():
            if state.qubes[name]["klass"] == "TemplateVM":
                template.unmount(layout, name)
    daemon.stop_singleton(layout, daemon.QREXEC)
    daemon.stop_singleton(layout, dom0.HOLDER)
    world.down(world.World(layout))
    shutil.rmtree(layout.home)
    return True
