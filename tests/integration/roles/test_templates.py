"""The templates role on qubesim: a converged template is left alone without any download; a
missing package comes through Qubes' updates proxy (the template has no network), and the running
qubes of the infrastructure based on the template, the net qube last, are restarted to see it,
decided from what each has (dom0's record of their roots, then their own package databases), so
that an interrupted run is repaired by the next, and a converged run restarts nothing."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.conftest import as_root, audit_since, copy_inventory, run_tool, site

TEMPLATE = "debian-12"
# A small package (no dependencies beyond libc) that this machine does not have.
NEW_PACKAGE = "hello"


def templates(*arguments: str) -> subprocess.CompletedProcess[str]:
    return site("--tags", "templates", *arguments)


def running(qube: str) -> bool:
    return run_tool("qvm-check", "--running", qube, check=False).returncode == 0


def recap(output: str, host: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"{host} "))


def start_without_the_package(qube: str) -> None:
    """The qube runs its template's root as it is now, which lacks NEW_PACKAGE (an earlier test
    may have left it running with a root that had it)."""
    run_tool("qvm-shutdown", "--wait", "--force", qube, check=False)
    run_tool("qvm-start", qube)
    assert as_root(qube, f"dpkg-query -W {NEW_PACKAGE}", check=False).returncode


@pytest.fixture(scope="module")
def converged() -> None:
    first = site("--tags", "dom0,templates")
    assert first.returncode == 0, first.stdout + first.stderr


def test_a_converged_template_changes_nothing_and_downloads_nothing(converged: None) -> None:
    run_tool("qvm-start", "--skip-if-running", "build-fedora")
    as_root("build-fedora", "touch /tmp/before-the-run")
    started = datetime.now(UTC)
    again = templates("--diff")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed=0" in recap(again.stdout, TEMPLATE)
    checked = templates("--check", "--diff")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "changed=0" in recap(checked.stdout, TEMPLATE)
    calls = [entry for entry in audit_since(started) if entry["service"] == "qubes.UpdatesProxy"]
    assert calls == []
    # The template's start and shutdown made the qube's root outdated, but it has every package:
    # it was not restarted.
    assert run_tool("qvm-volume", "info", "build-fedora:root", "is_outdated").stdout == "True\n"
    assert as_root("build-fedora", "test -e /tmp/before-the-run", check=False).returncode == 0


def test_packages_unknown_for_a_kind_are_refused(converged: None) -> None:
    refused = site("--tags", "templates", "-e", json.dumps({"templates_packages": {"build": {}}}))
    assert refused.returncode != 0
    assert "templates_packages describes only build" in refused.stdout


def test_a_new_package_comes_through_the_proxy_and_reaches_restarted_qubes(
    converged: None,
) -> None:
    lacking = subprocess.run(["dpkg-query", "-W", NEW_PACKAGE], capture_output=True, check=False)
    assert lacking.returncode != 0, f"this machine has {NEW_PACKAGE}: the test needs one it lacks"
    for qube in ("build-fedora", "sys-net"):
        start_without_the_package(qube)
        as_root(qube, "touch /tmp/before-the-update")
    run_tool("qvm-shutdown", "--wait", "keys-kernel")
    started = datetime.now(UTC)
    extra = json.dumps({"templates_extra_packages": [NEW_PACKAGE]})
    try:
        updated = templates("-e", extra)
        assert updated.returncode == 0, updated.stdout + updated.stderr
        assert "changed=0" not in recap(updated.stdout, TEMPLATE)

        calls = [e for e in audit_since(started) if e["service"] == "qubes.UpdatesProxy"]
        assert calls, "the package did not come through qubes.UpdatesProxy"
        assert {(e["source"], e["actual_target"], e["decision"]) for e in calls} == {
            (TEMPLATE, "sys-net", "allow")
        }
        status = as_root(TEMPLATE, f"dpkg-query -W -f='${{Status}}' {NEW_PACKAGE}").stdout
        assert status == "install ok installed"

        # The build qube and the net qube were restarted (their roots are new) and run the
        # package; a halted qube stays halted.
        for qube in ("build-fedora", "sys-net"):
            assert running(qube)
            assert as_root(qube, "test -e /tmp/before-the-update", check=False).returncode
            hello = run_tool("qvm-run", "--pass-io", qube, NEW_PACKAGE)
            assert hello.stdout == "Hello, world!\n"
        assert not running("keys-kernel")

        again = templates("-e", extra)
        assert "changed=0" in recap(again.stdout, TEMPLATE)
    finally:
        as_root(TEMPLATE, f"dpkg --purge {NEW_PACKAGE}", check=False)
        run_tool("qvm-shutdown", "--wait", TEMPLATE, check=False)


def test_a_run_stopped_before_the_restarts_is_repaired_by_the_next(converged: None) -> None:
    # The state such a run leaves: the template has the package (installed as the role would,
    # through the proxy) and has not shut down; a qube based on it runs its old root, without it.
    start_without_the_package("build-fedora")
    as_root("build-fedora", "touch /tmp/before-the-update")
    try:
        as_root(TEMPLATE, f"apt-get install --assume-yes {NEW_PACKAGE}")
        extra = json.dumps({"templates_extra_packages": [NEW_PACKAGE]})
        repaired = templates("-e", extra)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert as_root("build-fedora", "test -e /tmp/before-the-update", check=False).returncode
        hello = run_tool("qvm-run", "--pass-io", "build-fedora", NEW_PACKAGE)
        assert hello.stdout == "Hello, world!\n"
        again = templates("-e", extra)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "changed=0" in recap(again.stdout, TEMPLATE)
    finally:
        as_root(TEMPLATE, f"dpkg --purge {NEW_PACKAGE}", check=False)
        run_tool("qvm-shutdown", "--wait", TEMPLATE, check=False)


def test_the_templates_role_runs_on_a_minimal_template(tmp_path: Path) -> None:
    """The example's keys template on a real host is a minimal one (fedora-43-minimal), which has
    no passwordless sudo: root comes from qrexec (the qubes become method)."""
    inventory = tmp_path / "inventory"
    copy_inventory(inventory)
    settings = inventory / "group_vars/all/build_infra.yml"
    settings.write_text(
        settings.read_text().replace(
            "build_infra_keys_template: debian-12", "build_infra_keys_template: debian-12-minimal"
        )
    )
    # A package to install: root is needed only then (a converged template asks nothing).
    extra = json.dumps({"templates_extra_packages": [NEW_PACKAGE]})
    try:
        result = site(
            "--tags", "templates", "--limit", "debian-12-minimal", "-e", extra,
            inventory=str(inventory / "build_infra.yml"),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        status = as_root("debian-12-minimal", f"dpkg-query -W -f='${{Status}}' {NEW_PACKAGE}")
        assert status.stdout == "install ok installed"
    finally:
        as_root("debian-12-minimal", f"dpkg --purge {NEW_PACKAGE}", check=False)
        run_tool("qvm-shutdown", "--wait", "debian-12-minimal", check=False)
