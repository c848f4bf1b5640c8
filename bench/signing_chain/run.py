"""Benchmark of the log path of the signing chain, run inside `qubesim dom0` (see `make bench`).

On the simulated example converged with `qubesim world` (site.yml, as `make demo` runs it), one run
measures side by side:

* 1 GiB of build output (lines of 100 bytes) from build-fedora, through qrexec into
  qubesbuilder.BuildLog's stored file, against the same bytes through qrexec into `cat >/dev/null`
  in the logs qube (the floor: what qrexec alone costs);
* the receiver's peak memory while it stores those lines, measured in the logs qube;
* the time from the end of a build (its log's input closed) to the open signing window in
  keys-fedora, which is when the BuildLog call returns (stored, committed, pushed, announced).

`--baseline FILE` measures another receiver module (say an earlier version,
`git show REV:services/qubes_infra_services/build_log_receiver.py`, run with the installed
package's other modules) in the same run, the same way: through qrexec into its stored file (in
a scratch folder, so it publishes nothing), and its peak memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INVENTORY = "inventory/qubesim/build_infra.yml"
PROGRAMS = "/usr/local/lib/qubes-infra-build"
RECEIVER = f"{PROGRAMS}/build_log_receiver.py"
# The baseline module goes into the installed package, with a program that runs its main().
BASELINE = f"{PROGRAMS}/bench_baseline_receiver.py"
BASELINE_MODULE = f"{PROGRAMS}/qubes_infra_services/bench_baseline_receiver.py"
BASELINE_PROGRAM = """import sys
from qubes_infra_services.bench_baseline_receiver import main
sys.exit(main(sys.argv))
"""
SCRATCH_CONFIG = "/home/user/bench.json"
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
    ["python3", sys.argv[4]],
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


def in_qube(qube: str, command: str, *, user: str | None = None, input: str | None = None) -> str:
    argv = ["qvm-run", "--pass-io", *(["--user", user] if user else []), qube, command]
    return run(argv, input=input).stdout


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


def through_qrexec(
    service_target: str, service: str, size: int, *, must_succeed: bool = True
) -> tuple[float, float]:
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
    if must_succeed and answer[2] != "0":
        raise SystemExit(f"{service} exited {answer[2]}")
    return float(answer[0]), float(answer[1])


def scratch_settings() -> None:
    """Settings that store into a scratch folder (no repository: nothing is published), plain."""
    settings = (
        '{"directory": "/home/user/bench-logs", "compress_above_bytes": 1099511627776,'
        ' "max_stored_bytes": 1099511627776}'
    )
    in_qube(
        "build-logs",
        f"rm -rf ~/bench-logs; mkdir ~/bench-logs; echo '{settings}' > {SCRATCH_CONFIG}",
    )


def bench_services(baseline: Path | None) -> None:
    """In the logs qube, qrexec services that only read their input (the floor) and, with a
    baseline, that store it with the baseline receiver; the policy to reach them."""
    services = {"bench.Sink": "exec cat >/dev/null"}
    if baseline is not None:
        in_qube("build-logs", f"cat > {BASELINE_MODULE}", user="root", input=baseline.read_text())
        in_qube("build-logs", f"cat > {BASELINE}", user="root", input=BASELINE_PROGRAM)
        services["bench.Baseline"] = f"BUILD_LOGS_CONFIG={SCRATCH_CONFIG} exec python3 {BASELINE}"
    for service, command in services.items():
        path = f"/usr/local/etc/qubes-rpc/{service}"
        in_qube("build-logs", f"cat > {path} && chmod 0755 {path}", user="root",
                input=f"#!/bin/sh\n{command}\n")  # fmt: skip
    Path("/etc/qubes/policy.d/10-bench.policy").write_text(
        "".join(f"{service} * build-fedora build-logs allow\n" for service in services)
    )


def remove_bench_services() -> None:
    Path("/etc/qubes/policy.d/10-bench.policy").unlink(missing_ok=True)
    in_qube("build-logs", f"rm -f /usr/local/etc/qubes-rpc/bench.* {BASELINE} {BASELINE_MODULE}",
            user="root")  # fmt: skip


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


def receiver_peak_kib(size: int, program: str) -> int:
    """A receiver program alone in the logs qube, storing size bytes into a scratch folder."""
    scratch_settings()
    return int(python_in("build-logs", MEASURE_RECEIVER, str(size), str(LINE), SCRATCH_CONFIG,
                         program))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark of the signing chain's log path.")
    parser.add_argument("size", nargs="?", type=int, default=GIB, help="bytes of build output")
    parser.add_argument("--baseline", type=Path, help="another receiver program to measure")
    options = parser.parse_args()
    size, baseline = options.size, options.baseline
    converge()
    bench_services(baseline)
    scratch_settings()
    try:
        floor, _ = through_qrexec("build-logs", "bench.Sink", size)
        stored, published = through_qrexec("dom0", "qubesbuilder.BuildLog", size)
        if baseline is not None:
            # Its publishing step fails in the scratch folder, after it stored the log.
            before, _ = through_qrexec("build-logs", "bench.Baseline", size, must_succeed=False)
            scratch_settings()
        peak = receiver_peak_kib(size, RECEIVER)
        baseline_peak = receiver_peak_kib(size, BASELINE) if baseline is not None else 0
    finally:
        remove_bench_services()
        in_qube("build-logs", f"rm -rf ~/bench-logs {SCRATCH_CONFIG}")
    window = min(window_after_build() for _ in range(3))
    mib = size / (1 << 20)
    print(f"log path, {mib:.0f} MiB of {LINE}-byte lines from build-fedora:")
    print(f"  qrexec into cat (floor)         {floor:8.1f} s  {mib / floor:8.1f} MiB/s")
    print(f"  qrexec into BuildLog's file     {stored:8.1f} s  {mib / stored:8.1f} MiB/s")
    print(f"  BuildLog / floor                {stored / floor:8.2f}x the time")
    if baseline is not None:
        print(f"  qrexec into the baseline's file {before:8.1f} s  {mib / before:8.1f} MiB/s"
              f"  ({baseline})")  # fmt: skip
        print(f"  baseline / floor                {before / floor:8.2f}x the time")
    print(f"  then compressed, committed, pushed, announced in {published:.1f} s")
    print(f"  receiver peak memory            {peak / 1024:8.1f} MiB")
    if baseline is not None:
        print(f"  baseline's peak memory          {baseline_peak / 1024:8.1f} MiB")
    print(f"  end of a build -> signing window open: {window:.2f} s (best of 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
