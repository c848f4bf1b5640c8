"""The collection's entry point runs from the repository root inside dom0, on the example
inventory's qubesim variant: it creates the qubes and the policy, and converges."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import ROOT, Qvm, site


def test_site_dom0_creates_the_example_qubes_and_converges(qvm: Qvm) -> None:
    first = site("--tags", "dom0")
    assert first.returncode == 0, first.stdout + first.stderr
    names = qvm("qvm-ls", "--raw-list").stdout.split()
    for qube in ("build-fedora", "keys-fedora", "build-kernel", "keys-kernel", "build-logs"):
        assert qube in names
    assert qvm("qvm-prefs", "keys-fedora", "netvm").stdout == ""
    assert qvm("qvm-prefs", "build-fedora", "label").stdout == "green\n"
    again = site("--tags", "dom0", "--diff")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed=0" in again.stdout


def test_site_check_mode_changes_nothing_on_a_converged_host() -> None:
    site("--tags", "dom0")
    checked = site("--tags", "dom0", "--check", "--diff")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "changed=0" in checked.stdout


def test_removing_an_environment(qvm: Qvm, tmp_path: Path) -> None:
    """Its policy lines go at once; its qubes stay unless dom0_prune is true."""
    import shutil

    import yaml

    inventory = tmp_path / "inventory"
    shutil.copytree(ROOT / "inventory/qubesim", inventory)
    variables_file = inventory / "group_vars/all/build_infra.yml"
    variables = yaml.safe_load(variables_file.read_text())
    del variables["build_infra_envs"]["kernel"]
    variables_file.write_text(yaml.safe_dump(variables))
    policy = Path("/etc/qubes/policy.d/20-qubes-infra-build.policy")
    try:
        site("--tags", "dom0")
        kept = site("--tags", "dom0", inventory=str(inventory / "build_infra.yml"))
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert "build-kernel" not in policy.read_text()
        assert "build-kernel" in qvm("qvm-ls", "--raw-list").stdout.split()
        prune = ("--tags", "dom0", "-e", "dom0_prune=true")
        pruned = site(*prune, inventory=str(inventory / "build_infra.yml"))
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        names = qvm("qvm-ls", "--raw-list").stdout.split()
        assert "build-kernel" not in names and "keys-kernel" not in names
        assert "build-fedora" in names
    finally:
        site("--tags", "dom0")  # the example again, for the other tests
