"""The collection's entry point runs from the repository root inside dom0, on the example
inventory's qubesim variant: it creates the qubes and the policy, and converges."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import Qvm, changed_inventory, copy_inventory, site

POLICY = Path("/etc/qubes/policy.d/20-qubes-infra-build.policy")


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
    import yaml

    inventory = tmp_path / "inventory"
    copy_inventory(inventory)
    variables_file = inventory / "group_vars/all/build_infra.yml"
    variables = yaml.safe_load(variables_file.read_text())
    del variables["build_infra_envs"]["kernel"]
    variables_file.write_text(yaml.safe_dump(variables))
    try:
        site("--tags", "dom0")
        kept = site("--tags", "dom0", inventory=str(inventory / "build_infra.yml"))
        assert kept.returncode == 0, kept.stdout + kept.stderr
        assert "build-kernel" not in POLICY.read_text()
        assert "build-kernel" in qvm("qvm-ls", "--raw-list").stdout.split()
        prune = ("--tags", "dom0", "-e", "dom0_prune=true")
        pruned = site(*prune, inventory=str(inventory / "build_infra.yml"))
        assert pruned.returncode == 0, pruned.stdout + pruned.stderr
        names = qvm("qvm-ls", "--raw-list").stdout.split()
        assert "build-kernel" not in names and "keys-kernel" not in names
        assert "build-fedora" in names
    finally:
        site("--tags", "dom0")  # the example again, for the other tests


@pytest.fixture(scope="module")
def changed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The example inventory with every environment's qubes and ssh lines changed."""
    return changed_inventory(
        tmp_path_factory.mktemp("changed") / "inventory",
        build_infra_build_netvm="sys-firewall",
        build_infra_remote_hosts={},
    )


def env_lines(env: str) -> list[str]:
    """The installed policy lines that name one environment's qubes (as source, target,
    argument or redirect)."""
    qubes = {f"build-{env}", f"keys-{env}"}

    def names(line: str) -> set[str]:
        return {word.removeprefix("+").removeprefix("target=") for word in line.split()}

    return [line for line in POLICY.read_text().splitlines() if names(line) & qubes]


@pytest.fixture(scope="module")
def example() -> None:
    """The example applied once; a test that changes it applies it again."""
    converged = site("--tags", "dom0")
    assert converged.returncode == 0, converged.stdout + converged.stderr


def test_a_limit_to_one_environment_changes_only_its_qubes_and_policy_lines(
    qvm: Qvm, example: None, changed: str
) -> None:
    kernel = env_lines("kernel")
    assert len(kernel) == 8
    try:
        limited = site("--tags", "dom0", "--limit", "env_fedora", inventory=changed)
        assert limited.returncode == 0, limited.stdout + limited.stderr
        assert qvm("qvm-prefs", "build-fedora", "netvm").stdout == "sys-firewall\n"
        assert qvm("qvm-prefs", "build-kernel", "netvm").stdout == "sys-whonix\n"
        ssh = [line for line in env_lines("fedora") if line.startswith("local.ConnectSSH")]
        assert [line.split()[1] for line in ssh] == ["+github.com"]
        assert env_lines("kernel") == kernel
        assert POLICY.read_text().splitlines()[-1] == "* * @anyvm @tag:qubes-infra-build deny"
        again = site("--tags", "dom0", "--limit", "env_fedora", inventory=changed)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "changed=0" in again.stdout
    finally:
        site("--tags", "dom0")


def test_a_limit_naming_qubes_of_an_environment_without_dom0_is_refused(
    qvm: Qvm, example: None, changed: str
) -> None:
    """dom0 makes the environment's qubes and policy: left out, they would silently stay as they
    were while the qubes' own roles applied the new description."""
    before = POLICY.read_text()
    refused = site("--tags", "dom0", "--limit", "build-fedora", inventory=changed)
    assert refused.returncode != 0
    assert "The limit build-fedora names qubes of the environments fedora but not dom0" in (
        refused.stdout
    )
    assert qvm("qvm-prefs", "build-fedora", "netvm").stdout == "sys-whonix\n"
    assert POLICY.read_text() == before
    assert "Limit to env_fedora (it includes dom0)" in refused.stdout
    # Without the dom0 role, the qubes' own roles may be run alone.
    alone = site("--tags", "templates", "--limit", "build-fedora")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    # A limit naming no environment's build or keys qube leaves no environment half applied.
    shared = site("--tags", "dom0", "--limit", "sys-net")
    assert shared.returncode == 0, shared.stdout + shared.stderr


def test_a_limited_run_refuses_a_policy_file_it_cannot_split(example: None, changed: str) -> None:
    """An installed policy without the environments' sections (an earlier version's file) cannot
    be rewritten for one environment without guessing the others' lines: nothing changes."""
    installed = POLICY.read_text()
    earlier = "".join(line + "\n" for line in installed.splitlines()
                      if not line.startswith("# Environment "))  # fmt: skip
    POLICY.write_text(earlier)
    try:
        refused = site("--tags", "dom0", "--limit", "env_fedora", inventory=changed)
        assert refused.returncode != 0
        assert "outside any environment's section" in refused.stdout
        assert "apply it once without --limit" in refused.stdout
        assert POLICY.read_text() == earlier
    finally:
        POLICY.write_text(installed)
