"""dom0: the inventory's qubes with their properties, and the one policy file of the
infrastructure, seen from dom0 itself."""

from __future__ import annotations

from typing import Any

testinfra_hosts = ["ansible://dom0"]
POLICY = "/etc/qubes/policy.d/20-qubes-infra-build.policy"


def test_the_keys_qubes_exist_black_and_without_network(host: Any) -> None:
    for env in ("fedora", "kernel"):
        row = host.check_output(f"qvm-ls --raw-data --fields label,netvm,class keys-{env}")
        assert row == "black|-|AppVM"


def test_the_policy_file_holds_the_signing_flows(host: Any) -> None:
    policy = host.file(POLICY)
    assert policy.is_file and policy.user == "root" and policy.mode == 0o644
    rules = [line.split() for line in policy.content_string.splitlines()]
    assert ["qubes.Gpg", "*", "build-fedora", "keys-fedora", "allow"] in rules
    log_rule = ["qubesbuilder.BuildLog", "*", "build-fedora", "dom0", "allow", "target=build-logs"]
    assert log_rule in rules
