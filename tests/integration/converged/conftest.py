"""One converged infrastructure for every test of this package: converging it is the longest step,
and each test leaves the qubes as it found them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from qubesim import world
from qubesim.layout import current
from tests.integration.conftest import as_root
from tests.integration.converged.chain import Chain


@pytest.fixture(scope="package")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    outside = world.World(current())
    world.up(outside)
    place = tmp_path_factory.mktemp("chain")
    variables = place / "vars.json"
    variables.write_text(
        json.dumps(
            {
                **outside.variables(),
                "keys_vm_key_algorithm": "ed25519",
                "keys_vm_public_keys_dir": str(place / "public-keys"),
            }
        )
    )
    variables.chmod(0o600)
    # The qubes outlive a test run (when they exist yet), and the world may have been made anew
    # since.
    as_root("build-logs", "rm -rf /home/user/QubesIncomingBuildLog", check=False)
    for env in ("fedora", "kernel"):
        as_root(f"build-{env}", "rm -rf /home/user/builder-r4.2", check=False)
    chain = Chain(outside, variables, place / "public-keys")
    first = chain.play()
    assert first.returncode == 0, first.stdout + first.stderr
    yield chain
