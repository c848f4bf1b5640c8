"""An AppVM's root is its template's root as of the template's last shutdown, taken at the
AppVM's start.

Upstream: qubes-core-admin (release4.2, release4.3) qubes/storage/lvm.py and
qubes/storage/reflink.py: a template's root volume is save_on_stop (committed when the template
stops), an AppVM's is snap_on_start (a snapshot of the committed volume taken at its start);
qubes/vm/standalonevm.py with qvm-create --standalone: the root is a copy of the template's.
Volume.is_outdated (lvm.py, reflink.py): a running AppVM's snapshot older than its template's
committed root, which `qvm-volume info VM:root is_outdated` prints (qubes-core-admin-client
qubesadmin/tools/qvm_volume.py, info_volume).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import Qvm

PACKAGE = "qubesim-snapshot-probe"


def _sh(qvm: Qvm, qube: str, command: str, user: str = "root") -> str:
    result = qvm("qvm-run", "--pass-io", "--user", user, qube, command, check=False)
    return result.stdout if result.returncode == 0 else f"exit {result.returncode}"


@pytest.fixture
def template(qvm: Qvm, new_name: Callable[[], str]) -> str:
    name = new_name()
    qvm("qvm-create", "--class", "TemplateVM", "--label", "black", name)
    return name


def _appvm(qvm: Qvm, new_name: Callable[[], str], template: str) -> str:
    name = new_name()
    qvm("qvm-create", "--label", "red", "--template", template, "--property", "netvm=", name)
    return name


def _outdated(qvm: Qvm, qube: str) -> str:
    return qvm("qvm-volume", "info", f"{qube}:root", "is_outdated").stdout


def _probe_package(place: Path) -> bytes:
    """A Debian package whose unit its install enables, as Debian's packages do
    (deb-systemd-helper in the postinst)."""
    root = place / PACKAGE
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: tests\n"
        "Description: a unit for the template snapshot tests\n"
    )
    postinst = root / "DEBIAN/postinst"
    postinst.write_text(f"#!/bin/sh\nset -e\ndeb-systemd-helper enable {PACKAGE}.service\n")
    postinst.chmod(0o755)
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    (units / f"{PACKAGE}.service").write_text(
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )
    subprocess.run(["dpkg-deb", "--build", str(root)], check=True, capture_output=True)
    return (place / f"{PACKAGE}.deb").read_bytes()


def test_a_package_installed_in_a_running_template_reaches_an_appvm_only_after_both_restart(
    qvm: Qvm, new_name: Callable[[], str], template: str, tmp_path: Path
) -> None:
    app = _appvm(qvm, new_name, template)
    qvm("qvm-start", template, app)
    deb = _probe_package(tmp_path)
    subprocess.run(
        ["qvm-run", "--pass-io", "-u", "root", template, "cat > /tmp/p.deb && dpkg -i /tmp/p.deb"],
        input=deb,
        check=True,
        capture_output=True,
    )
    installed = f"dpkg-query -W -f='${{Status}}' {PACKAGE}"
    assert _sh(qvm, template, installed) == "install ok installed"
    # The running AppVM keeps the root it started with.
    assert _sh(qvm, app, installed) != "install ok installed"
    # An AppVM started while the template runs gets the template as of its last shutdown.
    qvm("qvm-shutdown", "--wait", app)
    qvm("qvm-start", app)
    assert _sh(qvm, app, installed) != "install ok installed"
    assert _outdated(qvm, app) == "False\n"
    # The template's shutdown commits its root; the running AppVM still does not see it, and
    # dom0 says its root is outdated...
    qvm("qvm-shutdown", "--wait", template)
    assert _sh(qvm, app, installed) != "install ok installed"
    assert _outdated(qvm, app) == "True\n"
    assert _outdated(qvm, template) == "False\n"
    # ...until it restarts: then the package is there, and its unit, enabled by its install, runs.
    qvm("qvm-shutdown", "--wait", app)
    assert _outdated(qvm, app) == "False\n"
    qvm("qvm-start", app)
    assert _outdated(qvm, app) == "False\n"
    assert _sh(qvm, app, installed) == "install ok installed"
    assert _sh(qvm, app, f"systemctl is-active {PACKAGE}.service") == "active\n"


def test_a_standalone_starts_from_a_copy_of_its_templates_root(
    qvm: Qvm, new_name: Callable[[], str], template: str
) -> None:
    _sh(qvm, template, "echo committed > /etc/qubesim-probe")
    qvm("qvm-shutdown", "--wait", template)
    standalone = new_name()
    qvm(
        "qvm-create",
        "--class",
        "StandaloneVM",
        "--template",
        template,
        "--label",
        "red",
        "--property",
        "netvm=",
        standalone,
    )
    assert _sh(qvm, standalone, "cat /etc/qubesim-probe") == "committed\n"
    _sh(qvm, template, "echo changed > /etc/qubesim-probe")
    qvm("qvm-shutdown", "--wait", template)
    qvm("qvm-shutdown", "--wait", standalone)
    assert _sh(qvm, standalone, "cat /etc/qubesim-probe") == "committed\n"
    # Its root is its own: it persists across its restarts, and the template never sees it.
    _sh(qvm, standalone, "echo own > /etc/qubesim-standalone")
    qvm("qvm-shutdown", "--wait", standalone)
    assert _sh(qvm, standalone, "cat /etc/qubesim-standalone") == "own\n"
    assert _sh(qvm, template, "cat /etc/qubesim-standalone").startswith("exit")
