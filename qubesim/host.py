"""Making and unmaking the simulated host of one Qubes release: dom0 and its default policy, the
distribution's template and its minimal one, and the service qubes."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from qubesim import cgroup, daemon, dom0, ports, release, template, world
from qubesim.errors import QubesimError
from qubesim.layout import Layout
from qubesim.model import Database, State
from qubesim.runtime import Runtime
from qubesim.tools import TOOL_NAMES

# dom0's default policy files, per release (qubesim/dom0_policy/RELEASE, installed as they are).
POLICY_DIRECTORY = Path("/etc/qubes/policy.d")

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


def initialise(layout: Layout, wanted: str | None) -> tuple[str, list[str]]:
    """Create whatever of the simulated host is missing; return its release and what was created.
    A new host is of release `wanted` (None: the current one); a host keeps the release it was
    made with, and another one asked for is refused before anything changes."""
    require_root()
    check_qube_ports(layout)
    template.check_host_programs()
    database = Database(layout)
    existing = database.read().release if database.exists() else None
    made = release.chosen(str(layout.home), existing, wanted)
    layout.create()
    dom0.ensure_in_dom0(layout)
    database.create()
    _write_tool_shims(layout)
    _install_default_policy(made)
    full = template.host_template_name()
    created = []
    with database.transaction() as state:
        state.data["release"] = made
        created.extend(_add_templates(state, full))
        state.defaults["default_template"] = state.defaults["default_template"] or full
    template.prepare(layout, full, made)
    template.prepare(layout, template.minimal_template_name(full), made, minimal=True)
    runtime = Runtime(layout)
    for name in (full, template.minimal_template_name(full)):
        if not runtime.is_running(name):  # its AppVMs see the refreshed tools
            runtime.commit_template(name)
    # The qrexec daemon runs the code installed now; running qubes reconnect to it on their own.
    daemon.stop_singleton(layout, daemon.QREXEC)
    daemon.ensure_qrexec(layout)
    with database.transaction() as state:
        created.extend(_add_service_qubes(state, full))
        state.defaults["default_netvm"] = state.defaults["default_netvm"] or "sys-firewall"
    return made, created


def _add_templates(state: State, full: str) -> list[str]:
    """The distribution's template and its minimal one, as a Qubes installation has them."""
    created = []
    for name in (full, template.minimal_template_name(full)):
        if name not in state.qubes:
            state.add_qube(name, "TemplateVM", "black", None)
            created.append(name)
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


def default_policy_files(qubes_release: str) -> dict[str, bytes]:
    """dom0's default policy files of a release: path under policy.d -> content."""
    base = resources.files("qubesim") / "dom0_policy" / qubes_release
    files: dict[str, bytes] = {}
    for entry in base.iterdir():
        children = list(entry.iterdir()) if entry.is_dir() else [entry]
        for child in children:
            relative = child.name if child is entry else f"{entry.name}/{child.name}"
            files[relative] = child.read_bytes()
    return files


def _install_default_policy(qubes_release: str) -> None:
    """Install the release's default policy as its packages do: qubesim's copy replaces an
    outdated one (a default file is not to be edited: changes go into earlier files)."""
    for relative, content in default_policy_files(qubes_release).items():
        path = POLICY_DIRECTORY / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != content:
            temporary = path.with_name(f".{path.name}.new")
            temporary.write_bytes(content)
            temporary.chmod(0o644)
            os.replace(temporary, path)


def describe(layout: Layout) -> list[tuple[str, str]]:
    """What `qubesim info` prints: one (key, value) a line, in a fixed order; lists are
    space-separated and sorted."""
    state = Database(layout).read()
    templates = [name for name in state.names() if state.qube(name)["klass"] == "TemplateVM"]
    return [
        ("release", state.release),
        ("home", str(layout.home)),
        ("templates", " ".join(templates)),
        ("default_template", state.global_default("default_template") or ""),
    ]


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
    state = database.read() if database.exists() else None
    if state is not None:
        runtime = Runtime(layout)
        for name in state.names():
            runtime.kill(name)
    # Then whatever still runs in dom0 (it might start a qube again), and anything a qube left.
    if holder is not None:
        dom0.end_commands(layout)
    with contextlib.suppress(QubesimError):
        cgroup.kill_all(cgroup.of_host(layout))
    if state is not None:
        for name in state.names():
            if state.qubes[name]["klass"] == "TemplateVM":
                template.unmount(layout, name)
    daemon.stop_singleton(layout, daemon.QREXEC)
    daemon.stop_singleton(layout, dom0.HOLDER)
    world.down(world.World(layout))
    # Out of the way at once: a command that was still starting sees no host and refuses.
    removed = layout.home.with_name(f".{layout.home.name}.removed-{os.getpid()}")
    layout.home.rename(removed)
    shutil.rmtree(removed)
    return True
