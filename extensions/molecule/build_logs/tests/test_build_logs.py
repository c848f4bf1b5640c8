"""build_logs: the BuildLog receiver, and a logs repository whose head the logs key signed."""

from __future__ import annotations

import json
from typing import Any

testinfra_hosts = ["ansible://logs_vms"]


def test_the_receiver_is_a_qrexec_service_of_root(host: Any) -> None:
    service = host.file("/usr/local/etc/qubes-rpc/qubesbuilder.BuildLog")
    assert service.is_file and service.user == "root" and service.mode == 0o755
    settings = json.loads(host.file("/usr/local/etc/qubes-infra-build/build-logs.json").content)
    assert settings["directory"] == "/home/user/QubesIncomingBuildLog"
    assert len(settings["logs_key"]) == 40


def test_the_checkout_head_carries_the_logs_key_signature(host: Any) -> None:
    verified = host.run("git -C ~/QubesIncomingBuildLog verify-commit --raw HEAD")
    assert verified.rc == 0 and "TRUST_ULTIMATE" in verified.stderr
    assert host.check_output("git config --global commit.gpgsign") == "true"
