"""The bounds of the log path on the converged example, with the world's logs repository behind
a real sshd refusing, as GitHub refuses files over 100 MiB, any blob over 1 MiB (a pre-receive
hook): a log larger than that is cut under build_logs_max_stored_bytes and published; a log the
remote refuses all the same (the cap set above the remote's limit) is set aside and shown by
verify.yml, and another environment's next log is published and opens its signing window."""

from __future__ import annotations

import json
import lzma
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tests.integration.conftest import as_root
from tests.integration.converged.chain import Chain, in_qube
from tests.integration.converged.test_signing_chain import (
    close_window,
    send_log,
    sign,
    window_open,
)
from tests.integration.converged.test_verify_report import verify

CONFIG = "/usr/local/etc/qubes-infra-build/build-logs.json"
SET_ASIDE = "/home/user/QubesIncomingBuildLog/.set-aside"
LIMIT = 1 << 20
HOOK = f"""#!/bin/sh
# Refuses any pushed blob over {LIMIT} bytes, as GitHub refuses files over 100 MiB.
while read old new ref; do
  git rev-list --objects "$old..$new" |
    git cat-file --batch-check='%(objecttype) %(objectsize) %(rest)' |
    awk '$1 == "blob" && $2 > {LIMIT} {{ bad = 1; print "error: " $3 " is too large" }}
         END {{ exit bad }}' >&2 || exit 1
done
"""
# 3 MB of random bytes as base64 lines: about 4.4 MB stored, more than 3 MB compressed.
RANDOM_LOG = (
    "head -c 3000000 /dev/urandom | base64 -w 100 | qrexec-client-vm dom0 qubesbuilder.BuildLog"
)


@contextmanager
def remote_with_a_size_limit(chain: Chain) -> Iterator[None]:
    hook = chain.world.logs_repository / "hooks" / "pre-receive"
    hook.write_text(HOOK)
    hook.chmod(0o755)
    try:
        yield
    finally:
        hook.unlink()


@contextmanager
def logs_settings(**changes: int) -> Iterator[None]:
    """The receiver's settings in the logs qube changed for the test, restored after."""
    saved = as_root("build-logs", f"cat {CONFIG}").stdout
    as_root("build-logs", f"cat > {CONFIG}", input=json.dumps({**json.loads(saved), **changes}))
    try:
        yield
    finally:
        as_root("build-logs", f"cat > {CONFIG}", input=saved)


def stored(chain: Chain, name: str) -> bytes:
    return subprocess.run(
        ["git", "--git-dir", str(chain.world.logs_repository), "show", f"master:{name}"],
        capture_output=True,
        check=True,
    ).stdout


def test_a_log_over_the_remotes_limit_is_cut_under_the_cap_and_published(chain: Chain) -> None:
    close_window("keys-fedora", "build-fedora")
    with remote_with_a_size_limit(chain), logs_settings(max_stored_bytes=768 << 10):
        sent = in_qube("build-fedora", RANDOM_LOG)
    assert sent.returncode == 0, sent.stderr
    name = sent.stdout.strip()
    assert name.startswith("build-fedora/log_") and name.endswith(".xz")
    packed = stored(chain, name)
    assert len(packed) <= 768 << 10
    lines = lzma.decompress(packed).decode().splitlines()
    assert lines[-2].endswith("build-fedora: > log truncated: stored size limit reached")
    assert lines[-1].endswith("build-fedora: > closing log")
    assert window_open("keys-fedora", "build-fedora")


def test_a_log_the_remote_refuses_is_set_aside_and_another_environment_signs(
    chain: Chain,
) -> None:
    for env in ("fedora", "kernel"):
        close_window(f"keys-{env}", f"build-{env}")
    before = chain.logs("rev-parse", "master").stdout
    try:
        # A cap above the remote's limit: the remote refuses the log.
        with remote_with_a_size_limit(chain), logs_settings(max_stored_bytes=8 << 20):
            refused = in_qube("build-fedora", RANDOM_LOG)
            assert refused.returncode != 0
            name = refused.stdout.strip()
            assert chain.logs("rev-parse", "master").stdout == before
            assert not window_open("keys-fedora", "build-fedora")
            # The next log of another environment is published, and its build qube signs.
            published = send_log("build-kernel", "built while a log was refused\n")
            assert published.returncode == 0, published.stderr
        assert published.stdout.strip() in chain.logs("show", "--stat", "master").stdout
        assert window_open("keys-kernel", "build-kernel")
        assert sign("build-kernel").returncode == 0
        assert not window_open("keys-fedora", "build-fedora")
        kept = as_root("build-logs", f"xz -dcf {SET_ASIDE}/{name} | tail -n 1").stdout
        assert kept.endswith("build-fedora: > closing log\n")
        assert (
            "refused the commit of " + name
            in as_root("build-logs", "journalctl -t qubesbuilder.BuildLog --no-pager -o cat").stdout
        )
        report = verify(chain, "--tags", "logs", "--limit", "dom0,build-logs")
        assert report.returncode != 0
        result, detail = report.rows[("build-logs", "set-aside logs")]
        assert result == "FAIL" and detail.startswith("1 refused by the logs repository")
    finally:
        # What an operator does once the log is looked at (the role's README).
        as_root("build-logs", f"rm -rf {SET_ASIDE}")
