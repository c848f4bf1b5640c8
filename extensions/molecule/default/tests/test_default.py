"""The whole site on its qubes, seen through the collection's connection plugin."""

from __future__ import annotations

import pytest

testinfra_hosts = ["ansible://build_vms"]


def test_the_build_qube_signs_in_its_own_keys_qube(host: pytest.FixtureRequest) -> None:
    domain = host.file("/rw/config/gpg-split-domain")
    assert domain.exists and domain.user == "root" and domain.mode == 0o644
    assert domain.content_string.strip() == "keys-" + host.backend.host.removeprefix("build-")
