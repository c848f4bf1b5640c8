"""A real gpg for the tests of what reads OpenPGP keys, and its own answer read independently of
the code under test."""

from __future__ import annotations

import subprocess
from pathlib import Path


def gpg(home: Path, *arguments: str, input: str | None = None) -> str:
    return subprocess.run(
        ["gpg", "--batch", "--homedir", str(home), *arguments],
        input=input,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def listed_primaries(listing: str) -> list[str]:
    """Field 10 of the fpr record after each pub or sec record of a --with-colons listing."""
    lines = listing.splitlines()
    return [
        lines[index + 1].split(":")[9]
        for index, line in enumerate(lines)
        if line.startswith(("pub:", "sec:"))
    ]
