"""The bounds of the build_logs role's log path, with the real receiver and publisher, real git
and gpg, and a remote whose pre-receive hook stands in for GitHub's file size limit: the stored
log's cap, the set-aside of a commit the remote refuses, the per-caller quota, lines longer
than a read, logs a dead receiver left behind."""

from __future__ import annotations

import base64
import fcntl
import lzma
import os
import re
import subprocess
import time
from pathlib import Path

from tests.unit.services import test_build_log_receiver as receiver_tests
from tests.unit.services.test_build_log_receiver import LINE, Setup, _run

# The receiver tests' fixtures: a logs key, a signed remote and its clone, the settings.
keys = receiver_tests.keys
setup = receiver_tests.setup

HOOK = """#!/bin/sh
# Refuses any pushed blob over {limit} bytes, as GitHub refuses files over 100 MiB.
while read old new ref; do
  git rev-list --objects "$old..$new" |
    git cat-file --batch-check='%(objecttype) %(objectsize) %(rest)' |
    awk -v limit={limit} '$1 == "blob" && $2 > limit {{ bad = 1; print $3 > "/dev/stderr" }}
                          END {{ exit bad }}' || exit 1
done
"""


def random_lines(size: int, seed: int = 0) -> bytes:
    """Printable lines that compress little (base64 of random bytes)."""
    return base64.encodebytes(os.urandom(size * 3 // 4 + 3))[:size].rstrip(b"\n") + b"\n"


def refuse_blobs_over(setup: Setup, limit: int) -> None:
    hook = setup.remote / "hooks" / "pre-receive"
    hook.write_text(HOOK.format(limit=limit))
    hook.chmod(0o755)


def texts_of(path: Path) -> list[str]:
    data = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
    lines = data.decode().splitlines()
    matches = [LINE.match(line.replace("build-b: ", "build-a: ", 1)) for line in lines]
    assert all(matches), lines[:3]
    return [match.group(1) for match in matches if match]


def stored_name(result: subprocess.CompletedProcess[bytes]) -> str:
    name = result.stdout.decode().strip()
    assert re.fullmatch(r"build-[ab]/log_[0-9_-]+(\.\d+)?(\.xz)?", name), name
    return name


def remote_files(setup: Setup) -> list[str]:
    return _run("git", "--git-dir", str(setup.remote), "ls-tree", "-r", "--name-only", "master")\
        .split()  # fmt: skip


def test_a_stored_log_is_capped_with_a_marker(setup: Setup) -> None:
    setup.settings(max_stored_bytes=300_000)
    sent = random_lines(1_500_000)
    result = setup.receive(sent)
    assert result.returncode == 0, result.stderr.decode()
    name = stored_name(result)
    assert name.endswith(".xz")
    stored = setup.clone / name
    assert stored.stat().st_size <= 300_000
    assert b"cut at 300000 bytes stored" in result.stderr
    texts = texts_of(stored)
    assert texts[0] == "> starting log"
    assert texts[-2:] == ["> log truncated: stored size limit reached", "> closing log"]
    # Whole lines, in order, from the start; then the cut.
    assert texts[1:-2] == sent.decode().splitlines()[: len(texts) - 3]
    assert len(texts) - 3 > 1000
    assert name in remote_files(setup)
    assert setup.notified.read_text() == "build-a\n"


def test_a_log_over_the_cap_is_compressed_whatever_the_compression_threshold(
    setup: Setup,
) -> None:
    setup.settings(max_stored_bytes=300_000, compress_above_bytes=10 << 20)
    sent = b"".join(b"make[2]: building part %d\n" % n for n in range(20_000))
    name = stored_name(setup.receive(sent))
    assert name.endswith(".xz") and (setup.clone / name).stat().st_size < 300_000
    texts = texts_of(setup.clone / name)
    assert texts[1:-1] == sent.decode().splitlines()  # small once compressed: nothing cut


def test_a_commit_the_remote_refuses_is_set_aside_and_another_caller_publishes(
    setup: Setup,
) -> None:
    refuse_blobs_over(setup, 100_000)
    setup.settings(compress_above_bytes=10 << 20)
    before = remote_files(setup)
    big = setup.receive(random_lines(200_000), source="build-a")
    assert big.returncode == 1
    name = stored_name(big)
    assert b"refused the log's commit: set aside as" in big.stderr
    kept = setup.clone / ".set-aside" / name
    assert texts_of(kept)[1:3] and texts_of(kept)[-1] == "> closing log"
    assert not (setup.clone / name).exists()
    assert remote_files(setup) == before
    assert not setup.notified.exists()
    # The clone holds nothing of it: no commit left to push, nothing to commit.
    assert _run("git", "-C", str(setup.clone), "status", "--porcelain", env=setup.environment) == ""
    small = setup.receive(b"a small build\n", source="build-b")
    assert small.returncode == 0, small.stderr.decode()
    assert stored_name(small) in remote_files(setup)
    assert setup.notified.read_text() == "build-b\n"
    assert kept.exists()


def test_a_refused_commit_left_by_a_failed_push_does_not_block_the_next_caller(
    setup: Setup,
) -> None:
    setup.settings(compress_above_bytes=10 << 20)
    away = setup.remote.with_name("away.git")
    setup.remote.rename(away)
    big = setup.receive(random_lines(200_000), source="build-a")
    assert big.returncode == 1 and b"git fetch failed" in big.stderr
    away.rename(setup.remote)
    refuse_blobs_over(setup, 100_000)
    first = setup.receive(b"first small build\n", source="build-b")
    assert first.returncode == 0, first.stderr.decode()
    second = setup.receive(b"second small build\n", source="build-b")
    assert second.returncode == 0, second.stderr.decode()
    files = remote_files(setup)
    assert stored_name(first) in files and stored_name(second) in files
    assert stored_name(big) not in files
    assert (setup.clone / ".set-aside" / stored_name(big)).exists()
    assert setup.notified.read_text() == "build-b\nbuild-b\n"


def test_the_quota_removes_the_callers_oldest_published_logs_only(setup: Setup) -> None:
    setup.settings(compress_above_bytes=10 << 20)
    other = stored_name(setup.receive(random_lines(30_000), source="build-b"))
    names = []
    for _ in range(3):
        names.append(stored_name(setup.receive(random_lines(30_000))))
        time.sleep(1.1)  # one log a second: their names order them
    # A log of build-a the remote refuses: set aside, never published.
    refuse_blobs_over(setup, 60_000)
    refused = setup.receive(random_lines(80_000))
    assert refused.returncode == 1
    (setup.remote / "hooks" / "pre-receive").unlink()
    # A log of build-a being written (locked, fresh): not published either.
    writing = setup.clone / "build-a" / "log_2000-01-01_00-00-00"
    with open(writing, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(b"x" * 50_000)
        held.flush()
        sizes = {name: (setup.clone / name).stat().st_size for name in names}
        aside = (setup.clone / ".set-aside" / stored_name(refused)).stat().st_size
        # Room for the set-aside and the writing logs, the newest two published and the next
        # (as large as they are), not for the oldest.
        quota = aside + 50_000 + sizes[names[1]] + 2 * sizes[names[2]] + sizes[names[0]] // 2
        setup.settings(quota_bytes=quota)
        blobs = {n: _run("git", "-C", str(setup.clone), "rev-parse", f"HEAD:{n}",
                         env=setup.environment).strip() for n in names}  # fmt: skip
        last = setup.receive(random_lines(30_000))
        assert last.returncode == 0, last.stderr.decode()
        assert writing.read_bytes() == b"x" * 50_000
    assert not (setup.clone / names[0]).exists()
    assert not (setup.clone / ".git/objects" / blobs[names[0]][:2] / blobs[names[0]][2:]).exists()
    for name in (names[1], names[2], stored_name(last), other):
        assert (setup.clone / name).exists(), name
    assert (setup.clone / ".set-aside" / stored_name(refused)).exists()
    # Removed here only: the logs repository keeps it, and no commit deletes it.
    files = remote_files(setup)
    assert {names[0], other, stored_name(last)} <= set(files)
    status = _run("git", "-C", str(setup.clone), "status", "--porcelain", env=setup.environment)
    assert status == "?? build-a/log_2000-01-01_00-00-00\n"
    writing.unlink()
    # The next logs publish as before, and the removed log stays removed.
    again = setup.receive(b"again\n", source="build-b")
    assert again.returncode == 0, again.stderr.decode()
    assert names[0] in remote_files(setup) and not (setup.clone / names[0]).exists()


def test_lines_longer_than_a_read_are_cut_and_the_next_line_kept(setup: Setup) -> None:
    setup.settings(max_line_bytes=100)
    sent = b"a" * 100 + b"\n" + b"b" * 300_000 + b"\n" + b"after\n" + b"c" * 101
    texts = texts_of(setup.clone / stored_name(setup.receive(sent)))
    assert texts[1:-1] == ["a" * 100, "b" * 100 + " [line truncated]", "after",
                           "c" * 100 + " [line truncated]"]  # fmt: skip


def test_a_log_a_dead_receiver_left_goes_with_the_next_one_commit_each(setup: Setup) -> None:
    stray = setup.clone / "build-a" / "log_2000-01-01_00-00-00"
    stray.parent.mkdir()
    stray.write_text("2000-01-01 00:00:00.000000 +0000 build-a: > starting log\n")
    old = time.time() - 120
    os.utime(stray, (old, old))
    fresh = setup.clone / "build-a" / "log_2000-01-01_00-00-01"  # still being written
    fresh.write_text("partial\n")
    result = setup.receive(b"next\n")
    assert result.returncode == 0, result.stderr.decode()
    assert setup.remote_log()[:2] == [
        f"Build log {stored_name(result)}",
        "Build log build-a/log_2000-01-01_00-00-00",
    ]
    assert "build-a/log_2000-01-01_00-00-01" not in remote_files(setup)


def open_stream(setup: Setup, source: str) -> subprocess.Popen[bytes]:
    """A BuildLog call from source that has started its log and keeps streaming."""
    environment = {**setup.environment, "QREXEC_REMOTE_DOMAIN": source}
    stream = subprocess.Popen(
        ["python3", str(receiver_tests.RECEIVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )
    assert stream.stdin is not None
    stream.stdin.write(b"building\n")
    stream.stdin.flush()
    return stream


def test_a_caller_past_its_streams_is_refused_and_no_other_stream_is_touched(
    setup: Setup,
) -> None:
    setup.settings(max_streams=2)
    streams = [open_stream(setup, "build-a") for _ in range(2)]
    try:
        logs = setup.clone / "build-a"
        deadline = time.monotonic() + 30
        while len(list(logs.glob("log_*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = setup.receive(b"one more\n")
        assert refused.returncode == 1
        assert refused.stderr.decode().strip() == (
            "qubesbuilder.BuildLog: build-a already streams 2 logs"
            " (build_logs_max_streams_per_caller): refused"
        )
        assert len(list(logs.glob("log_*"))) == 2  # nothing stored for the refused call
        # Another build qube's slots are its own.
        assert setup.receive(b"other\n", source="build-b").returncode == 0
    finally:
        for stream in streams:
            assert stream.stdin is not None
            stream.stdin.close()
    # The streams going on end and are published; their slots are free again.
    assert [stream.wait(timeout=120) for stream in streams] == [0, 0]
    assert setup.receive(b"later\n").returncode == 0
    assert len(setup.remote_log()) == 1 + 4
