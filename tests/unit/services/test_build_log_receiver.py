"""The build_logs role's qubesbuilder.BuildLog receiver and its publishing step, run as the
qrexec service runs them (a process with the qrexec environment, the log on stdin), with real
git and gpg: a logs repository cloned from a bare remote whose history the logs key signs."""

from __future__ import annotations

import datetime
import json
import lzma
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.services import SERVICES
from tests.unit.services.qrexec_call import call_service

RECEIVER = SERVICES / "build_log_receiver.py"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} \+0000 build-a: (.*)$")

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg")


def _run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    return subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def _new_key(home: Path, uid: str) -> str:
    _run("gpg", "--homedir", str(home), "--batch", "--passphrase", "", "--quick-gen-key", uid,
         "ed25519", "sign", "never")  # fmt: skip
    listing = _run("gpg", "--homedir", str(home), "--with-colons", "--list-secret-keys", uid)
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


@dataclass
class Keys:
    home: Path
    logs: str
    intruder: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    return Keys(
        home,
        _new_key(home, "Build logs <logs@example.org>"),
        _new_key(home, "Intruder <intruder@example.org>"),
    )


@dataclass
class Setup:
    environment: dict[str, str]
    remote: Path
    clone: Path
    notified: Path
    config: Path
    keys: Keys

    def settings(self, **changes: object) -> None:
        values = json.loads(self.config.read_text())
        values.update(changes)
        self.config.write_text(json.dumps(values))

    def receive(
        self, data: bytes, *argv: str, source: str | None = "build-a"
    ) -> subprocess.CompletedProcess[bytes]:
        environment = dict(self.environment)
        if source is not None:
            environment["QREXEC_REMOTE_DOMAIN"] = source
        return call_service(RECEIVER, argv, data, environment)

    def remote_log(self) -> list[str]:
        """Subjects of the remote branch's commits, newest first."""
        out = _run("git", "--git-dir", str(self.remote), "log", "--format=%s", "master")
        return out.splitlines()


def _git_environment(keys: Keys, home: Path) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "GNUPGHOME": str(keys.home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_DATE": "",
        "LC_ALL": "C.UTF-8",
    }


def _identity(repository: Path, key: str, environment: dict[str, str]) -> None:
    for name, value in (
        ("user.name", "Build bot"),
        ("user.email", "bot@example.org"),
        ("user.signingkey", key),
        ("commit.gpgsign", "true"),
    ):
        _run("git", "-C", str(repository), "config", name, value, env=environment)


@pytest.fixture
def setup(tmp_path: Path, keys: Keys) -> Iterator[Setup]:
    environment = _git_environment(keys, tmp_path)
    environment.pop("GIT_AUTHOR_DATE")
    remote = tmp_path / "remote.git"
    _run(
        "git", "init", "--quiet", "--bare", "--initial-branch=master", str(remote), env=environment
    )
    seed = tmp_path / "seed"
    _run("git", "init", "--quiet", "--initial-branch=master", str(seed), env=environment)
    _identity(seed, keys.logs, environment)
    (seed / "README").write_text("build logs\n")
    _run("git", "-C", str(seed), "add", "README", env=environment)
    _run("git", "-C", str(seed), "commit", "--quiet", "-m", "start", env=environment)
    _run("git", "-C", str(seed), "push", "--quiet", str(remote), "master", env=environment)
    clone = tmp_path / "QubesIncomingBuildLog"
    _run("git", "clone", "--quiet", str(remote), str(clone), env=environment)
    _identity(clone, keys.logs, environment)
    notified = tmp_path / "notified"
    config = tmp_path / "build-logs.json"
    config.write_text(
        json.dumps(
            {
                "directory": str(clone),
                "logs_key": keys.logs,
                "notify": ["sh", "-c", f'echo "$0" >> {notified}', "{source}"],
            }
        )
    )
    environment["BUILD_LOGS_CONFIG"] = str(config)
    yield Setup(environment, remote, clone, notified, config, keys)


def _stored(setup: Setup, result: subprocess.CompletedProcess[bytes]) -> Path:
    assert result.returncode == 0, result.stderr.decode()
    name = result.stdout.decode().strip()
    assert re.fullmatch(r"build-a/(\w+/)?log_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(\.\d+)?(\.xz)?", name)
    return setup.clone / name


def _texts(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    return [match.group(1) for match in matches if match]


def test_a_log_is_stored_committed_signed_pushed_and_announced(setup: Setup) -> None:
    result = setup.receive(b"configure\nmake all\nbuilt foo-1.0.rpm\n")
    stored = _stored(setup, result)
    assert _texts(stored) == [
        "> starting log",
        "configure",
        "make all",
        "built foo-1.0.rpm",
        "> closing log",
    ]
    name = str(stored.relative_to(setup.clone))
    assert setup.remote_log() == [f"Build log {name}", "start"]
    verified = subprocess.run(
        ["git", "--git-dir", str(setup.remote), "verify-commit", "--raw", "master"],
        env=setup.environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"VALIDSIG {setup.keys.logs}" in verified.stderr
    shown = _run("git", "--git-dir", str(setup.remote), "show", f"master:{name}")
    assert shown == stored.read_text()
    assert setup.notified.read_text() == "build-a\n"


def test_lines_are_sanitised_and_the_argument_is_one_safe_folder(setup: Setup) -> None:
    stored = _stored(setup, setup.receive(b"\x1b]0;title\x07red \x1b[31mX\x00\xc3\xa9\n", "../x y"))
    assert stored.parent.name == "___x_y" and stored.parent.parent.name == "build-a"
    assert _texts(stored)[1] == ".]0;title.red .[31mX..."


def test_names_never_collide(setup: Setup) -> None:
    now = datetime.datetime.now(datetime.UTC)
    for second in range(3):
        moment = now + datetime.timedelta(seconds=second)
        taken = setup.clone / "build-a" / moment.strftime("log_%Y-%m-%d_%H-%M-%S")
        taken.parent.mkdir(parents=True, exist_ok=True)
        taken.write_text("an earlier log\n")
    stored = _stored(setup, setup.receive(b"hello\n"))
    assert stored.name.endswith(".1")
    assert _texts(stored)[1] == "hello"


def test_long_lines_and_long_logs_are_cut_with_a_marker(setup: Setup) -> None:
    setup.settings(max_line_bytes=100, max_log_bytes=2000)
    long_line = b"x" * 5000 + b"\n"
    result = setup.receive(b"first\n" + long_line + b"after\n" + b"filler line\n" * 500)
    texts = _texts(_stored(setup, result))
    assert texts[1] == "first"
    assert texts[2] == "x" * 100 + " [line truncated]"
    assert texts[3] == "after"
    assert texts[-2] == "> log truncated: size limit reached"
    assert texts[-1] == "> closing log"
    assert len(texts) < 40


def test_every_line_is_stored_before_the_next_is_read_and_a_killed_build_keeps_them(
    setup: Setup,
) -> None:
    environment = {**setup.environment, "QREXEC_REMOTE_DOMAIN": "build-a"}
    receiver = subprocess.Popen(
        ["python3", str(RECEIVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )
    try:
        assert receiver.stdin is not None
        for number in range(5):
            receiver.stdin.write(f"step {number}\n".encode())
            receiver.stdin.flush()
        logs = setup.clone / "build-a"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            files = list(logs.glob("log_*")) if logs.exists() else []
            if files and files[0].read_text().count("step ") == 5:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the lines sent were not stored while the build went on")
        assert receiver.poll() is None  # still receiving: nothing was buffered until the end
        receiver.stdin.write(b"half a li")  # the build dies mid-line
        receiver.stdin.close()
        receiver.wait(timeout=120)  # what it prints is a line: it never blocks on its pipes
        assert receiver.stdout is not None
        stdout = receiver.stdout.read()
    finally:
        receiver.kill()
    texts = _texts(setup.clone / stdout.decode().strip())
    assert texts == [
        "> starting log",
        *[f"step {n}" for n in range(5)],
        "half a li",
        "> closing log",
    ]


def test_large_logs_are_compressed(setup: Setup) -> None:
    setup.settings(compress_above_bytes=10_000)
    stored = _stored(setup, setup.receive(b"".join(b"line %d\n" % n for n in range(2000))))
    assert stored.suffix == ".xz"
    lines = lzma.decompress(stored.read_bytes()).decode().splitlines()
    assert len(lines) == 2002 and lines[-2].endswith("build-a: line 1999")
    assert str(stored.relative_to(setup.clone)) in setup.remote_log()[0]


def test_a_remote_tip_not_signed_by_the_logs_key_is_refused(setup: Setup) -> None:
    other = setup.remote.parent / "other"
    _run("git", "clone", "--quiet", str(setup.remote), str(other), env=setup.environment)
    _identity(other, setup.keys.intruder, setup.environment)
    (other / "planted").write_text("x\n")
    _run("git", "-C", str(other), "add", "planted", env=setup.environment)
    _run("git", "-C", str(other), "commit", "--quiet", "-m", "planted", env=setup.environment)
    _run("git", "-C", str(other), "push", "--quiet", "origin", "master", env=setup.environment)
    result = setup.receive(b"hello\n")
    assert result.returncode != 0
    assert b"is not signed by the logs key" in result.stderr
    assert result.stdout.decode().startswith("build-a/log_")  # stored all the same
    assert setup.remote_log() == ["planted", "start"]
    assert not setup.notified.exists()


def test_a_failed_push_keeps_the_log_announces_nothing_and_goes_with_the_next(
    setup: Setup,
) -> None:
    away = setup.remote.with_name("away.git")
    setup.remote.rename(away)
    first = setup.receive(b"first build\n")
    assert first.returncode != 0 and b"git fetch failed" in first.stderr
    assert not setup.notified.exists()
    away.rename(setup.remote)
    second = setup.receive(b"second build\n")
    assert second.returncode == 0, second.stderr.decode()
    subjects = setup.remote_log()
    assert len(subjects) == 3 and subjects[-1] == "start"
    assert {first.stdout.decode().strip(), second.stdout.decode().strip()} == {
        subject.removeprefix("Build log ") for subject in subjects[:2]
    }
    assert setup.notified.read_text() == "build-a\n"


def test_a_call_without_a_caller_stores_nothing(setup: Setup) -> None:
    result = setup.receive(b"hello\n", source=None)
    assert result.returncode != 0 and b"no valid caller" in result.stderr
    assert not (setup.clone / "build-a").exists()


def test_a_directory_that_is_no_repository_keeps_the_log_and_says_why(
    setup: Setup, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    setup.settings(directory=str(plain))
    result = setup.receive(b"hello\n")
    assert result.returncode == 1
    assert b"cannot be used" in result.stderr and b"Traceback" not in result.stderr
    (stored,) = (plain / "build-a").glob("log_*")
    assert _texts(stored)[1] == "hello"
