"""Benchmark of the log path of the signing chain, run inside `qubesim dom0` (see `make bench`).

On the simulated example converged with `qubesim world` (site.yml, as `make demo` runs it), one run
measures side by side:

* 1 GiB of build output (lines of 100 bytes) from build-fedora, through qrexec into
  qubesbuilder.BuildLog's stored file, against the same bytes through qrexec into `cat >/dev/null`
  in the logs qube (the floor: what qrexec alone costs);
* the receiver's peak memory while it stores those lines, measured in the logs qube;
* the time from the end of a build (its log's input closed) to the open signing window in
  keys-fedora, which is when the BuildLog call returns (stored, committed, pushed, announced).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = "inventory/qubesim/build_infra.yml"
GIB = 1 << 30
LINE = 100
# In the build qube: write SIZE bytes of numbered lines to the command, report seconds elapsed.
SENDER = r"""
import subprocess, sys, time
size, line = int(sys.argv[1]), int(sys.argv[2])
chunk = b"".join(b"%0*d\n" % (line - 1, n) for n in range(1 << 14))
started = time.monotonic()
child = subprocess.Popen(sys.argv[3:], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
sent = 0
while sent < size:
    child.stdin.write(chunk)
    sent += len(chunk)
child.stdin.close()
closed = time.monotonic()
code = child.wait()
print(f"{closed - started:.3f} {time.monotonic() - closed:.3f} {code}")
"""
# In the logs qube: the receiver on SIZE bytes of lines, without qrexec; its peak memory in KiB.
MEASURE_RECEIVER = r"""
import os, resource, subprocess, sys
size, line = int(sys.argv[1]), int(sys.argv[2])
chunk = b"".join(b"%0*d\n" % (line - 1, n) for n in range(1 << 14))
environment = {**os.environ, "QREXEC_REMOTE_DOMAIN": "build-fedora"}
environment["BUILD_LOGS_CONFIG"] = sys.argv[3]
receiver = subprocess.Popen(
    ["python3", "/usr/local/lib/qubes-infra-build/build_log_receiver.py"],
    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment,
)
sent = 0
while sent < size:
    receiver.stdin.write(chunk)
    sent += len(chunk)
receiver.stdin.close()
receiver.wait()
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def in_qube(qube: str, command: str, *, user: str | None = None) -> str:
    argv = ["qvm-run", "--pass-io", *(["--user", user] if user else []), qube, command]
    return run(argv).stdout


def python_in(qube: str, program: str, *arguments: str) -> str:
    quoted = " ".join(f"'{argument}'" for argument in arguments)
    return in_qube(qube, f"python3 -c {_shell_quote(program)} {quoted}")


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def converge() -> None:
    variables = run(["qubesim", "world", "variables"]).stdout.strip()
    run(["qubesim", "world", "up"])
    run(
        ["ansible-playbook", "-i", INVENTORY, "-e", f"@{variables}", "site.yml"],
        cwd=ROOT,
        env={**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg")},
    )


def through_qrexec(service_target: str, service: str, size: int) -> tuple[float, float]:
    """Seconds build-fedora takes to push size bytes of lines into a qrexec service (the input,
    which the service takes as fast as it stores it), then until the call returns."""
    answer = python_in(
        "build-fedora",
        SENDER,
        str(size),
        str(LINE),
        "qrexec-client-vm",
        service_target,
        service,
    ).split()
    if answer[2] != "0":
        raise SystemExit(f"{service} exited {answer[2]}")
    return float(answer[0]), float(answer[1])


def floor_service() -> None:
    """A qrexec service in the logs qube that only reads its input, and the policy to reach it."""
    in_qube(
        "build-logs",
        "printf '#!/bin/sh\\nexec cat >/dev/null\\n' > /usr/local/etc/qubes-rpc/bench.Sink"
        " && chmod 0755 /usr/local/etc/qubes-rpc/bench.Sink",
        user="root",
    )
    Path("/etc/qubes/policy.d/10-bench.policy").write_text(
        "bench.Sink * build-fedora build-logs allow\n"
    )


def window_after_build() -> float:
    """Seconds from the end of a small build's log to the return of its BuildLog call, when the
    signing window is open; checked in keys-fedora."""
    in_qube("keys-fedora", "rm -f /run/qubes-gpg-split/stat.build-fedora", user="root")
    answer = python_in(
        "build-fedora", SENDER, str(100 * LINE), str(LINE), "qrexec-client-vm", "dom0",
        "qubesbuilder.BuildLog",
    ).split()  # fmt: skip
    if answer[2] != "0":
        raise SystemExit(f"qubesbuilder.BuildLog exited {answer[2]}")
    in_qube("keys-fedora", "test -e /run/qubes-gpg-split/stat.build-fedora")
    return float(answer[1])


def receiver_peak_kib(size: int) -> int:
    """The receiver alone in the logs qube, storing size bytes into a scratch folder."""
    settings = '{"directory": "/home/user/bench-logs", "compress_above_bytes": 1099511627776}'
    config = "/home/user/bench.json"
    in_qube("build-logs", f"rm -rf ~/bench-logs; mkdir ~/bench-logs; echo '{settings}' > {config}")
    peak = int(python_in("build-logs", MEASURE_RECEIVER, str(size), str(LINE), config))
    in_qube("build-logs", "rm -rf ~/bench-logs ~/bench.json")
    return peak


def main() -> int:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else GIB
    converge()
    floor_service()
    try:
        floor, _ = through_qrexec("build-logs", "bench.Sink", size)
        stored, published = through_qrexec("dom0", "qubesbuilder.BuildLog", size)
    finally:
        Path("/etc/qubes/policy.d/10-bench.policy").unlink(missing_ok=True)
        in_qube("build-logs", "rm -f /usr/local/etc/qubes-rpc/bench.Sink", user="root")
    peak = receiver_peak_kib(size)
    window = min(window_after_build() for _ in range(3))
    mib = size / (1 << 20)
    print(f"log path, {mib:.0f} MiB of {LINE}-byte lines from build-fedora:")
    print(f"  qrexec into cat (floor)         {floor:8.1f} s  {mib / floor:8.1f} MiB/s")
    print(f"  qrexec into BuildLog's file     {stored:8.1f} s  {mib / stored:8.1f} MiB/s")
    print(f"  BuildLog / floor                {stored / floor:8.2f}x the time")
    print(f"  then compressed, committed, pushed, announced in {published:.1f} s")
    print(f"  receiver peak memory            {peak / 1024:8.1f} MiB")
    print(f"  end of a build -> signing window open: {window:.2f} s (best of 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
