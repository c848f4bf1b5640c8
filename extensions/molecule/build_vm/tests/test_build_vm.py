"""build_vm: split-GPG to its own keys qube, rpm signing through it, builders at the pinned
commit, the builders list and the cleanup timer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

testinfra_hosts = ["ansible://build_vms"]
BUILDER = "/home/user/builder-r4.2"


def test_signing_goes_to_the_own_keys_qube(host: Any) -> None:
    env = host.backend.host.removeprefix("build-")
    assert host.file("/rw/config/gpg-split-domain").content_string.strip() == f"keys-{env}"
    assert "qubes-gpg-client-wrapper" in host.file("/home/user/.rpmmacros").content_string


def pinned_commit() -> str:
    variables = json.loads(Path(os.environ["QUBES_INFRA_MOLECULE_VARS"]).read_text())
    return str(variables["build_vm_builder_commit"])


def test_the_builder_is_at_the_pinned_commit_and_listed(host: Any) -> None:
    assert host.check_output(f"git -C {BUILDER} rev-parse HEAD") == pinned_commit()
    assert host.run(f"git -C {BUILDER} diff --quiet HEAD").rc == 0
    listed = host.file("/home/user/.config/qubes-builder-github/builders.list").content_string
    assert f"r4.2={BUILDER}" in listed
    assert host.file(f"{BUILDER}/builder.conf").is_symlink


def test_the_cleanup_timer_is_enabled_by_link(host: Any) -> None:
    link = host.file("/home/user/.config/systemd/user/timers.target.wants/builder-cleanup.timer")
    assert link.is_symlink and link.linked_to.endswith("/builder-cleanup.timer")
