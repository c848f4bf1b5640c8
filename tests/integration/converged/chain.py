"""The infrastructure converged with the world's variables (a logs repository behind a real sshd,
an upload server, a signed qubes-builder), and what its tests do in and around its qubes."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qubesim import world
from tests.integration.conftest import run_tool, site

BUILDER = "/home/user/builder-r4.2"


@dataclass
class Chain:
    world: world.World
    variables: Path
    public_keys: Path

    def play(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return site("-e", f"@{self.variables}", *arguments)

    def logs(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """git on the logs repository, with the keyring that verifies the logs key."""
        return subprocess.run(
            ["git", "--git-dir", str(self.world.logs_repository), *arguments],
            env=self.world.environment(),
            capture_output=True,
            text=True,
            check=False,
        )

    @property
    def logs_key(self) -> str:
        return str(self.world.variables()["build_logs_key_fingerprint"])


def in_qube(qube: str, command: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """A command as the qube's user, in a login shell as qrexec services and users have."""
    return run_tool("qvm-run", "--pass-io", qube, f"bash -lc {json.dumps(command)}",
                    input=input, check=False)  # fmt: skip


def build(qube: str, component: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """The test builder's auto-build in a build qube, as builder-github starts it."""
    variables = " ".join(f"{name}={value}" for name, value in settings.items())
    return in_qube(qube, f"{variables} {BUILDER}/scripts/auto-build {component}")


def verify_signature(chain: Chain, keys_qube: str, data: str, signature: str) -> bool:
    keyring = chain.world.directory / f"verify-{keys_qube}"
    keyring.mkdir(mode=0o700, exist_ok=True)
    environment = {"GNUPGHOME": str(keyring), "PATH": "/usr/bin:/bin"}
    public_key = (chain.public_keys / f"{keys_qube}.asc").read_text()
    subprocess.run(["gpg", "--batch", "--import"], input=public_key, env=environment,
                   text=True, capture_output=True, check=True)  # fmt: skip
    (keyring / "data").write_text(data)
    (keyring / "data.asc").write_text(signature)
    verified = subprocess.run(
        ["gpg", "--batch", "--verify", str(keyring / "data.asc"), str(keyring / "data")],
        env=environment,
        capture_output=True,
        check=False,
    )
    return verified.returncode == 0
