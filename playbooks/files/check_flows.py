"""check_flows.py FLOWS_JSON: ask dom0's policy about every flow; stop at the first wrong one.

Each flow is {"source", "target", "service", "expect"}; `expect` is the qube the call must reach,
or empty when it must be refused. qrexec-policy-exec --just-evaluate gives the verdict (exit 0 for
allow) and, on stderr, where an allowed call goes.
"""

from __future__ import annotations

import json
import subprocess
import sys


def verdict(flow: dict[str, str]) -> tuple[str, str]:
    """The qube the call reaches (empty when refused), and the tool's words."""
    result = subprocess.run(
        ["qrexec-policy-exec", "--just-evaluate", flow["source"], flow["target"], flow["service"]],
        capture_output=True,
        text=True,
        check=False,  # exit 1 is a verdict (refused), not a failure
    )
    detail = result.stderr.strip()
    if result.returncode != 0:
        return "", detail
    words = detail.split()
    # "allow to TARGET: ..." on a qubesim dom0; where a real dom0 does not say, trust the verdict.
    reached = words[2].rstrip(":") if words[:2] == ["allow", "to"] else flow["expect"] or "?"
    return reached, detail


def describe(target: str) -> str:
    return f"allowed to {target}" if target else "refused"


def main() -> int:
    with open(sys.argv[1]) as source:
        flows = json.load(source)
    for flow in flows:
        reached, detail = verdict(flow)
        if reached != flow["expect"]:
            print(
                f"wrong flow: {flow['source']} -> {flow['target']} {flow['service']} must be"
                f" {describe(flow['expect'])}, policy says {describe(reached)} ({detail})"
            )
            return 1
    print(f"all {len(flows)} flows as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
