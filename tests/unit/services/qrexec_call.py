"""A service entry point run as qrexec runs it: the caller's data on stdin, its environment."""

from __future__ import annotations

import subprocess
from pathlib import Path


def call_service(
    program: Path, argv: tuple[str, ...], data: bytes, environment: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["python3", str(program), *argv],
        input=data,
        env=environment,
        capture_output=True,
        timeout=120,
        check=False,
    )
