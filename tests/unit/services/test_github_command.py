"""The build_vm role's qubesbuilder.ProcessGithubCommand, run as qrexec runs it (the signed
message on stdin), with real gpg and gpgv: commands signed by a maintainer, a maintainer with
fewer rights and an intruder, against the world's stand-in of qubes-builder on a temp dir (its
make-with-log and auto-build-template record what they were asked)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qubes_infra_services import command_grammar, used_commands
from tests.unit.services import SERVICES
from tests.unit.services.test_trigger_build import (
    LOG_COMMAND_BUILD,
    Qube,
    make_builder,
    make_qube,
    wait_for,
)

COMMAND = SERVICES / "github_command.py"


pytestmark = pytest.mark.skipif(
    shutil.which("gpg") is None or shutil.which("gpgv") is None, reason="needs gpg and gpgv"
)
DAY = 86400


def _gpg(home: Path, *argv: str, data: str | None = None) -> str:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", *argv],
        input=data,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _stamp(seconds: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))


@dataclass
class Keys:
    home: Path
    maintainer: str
    limited: str
    intruder: str

    def sign(self, line: str, key: str | None = None, at: float | None = None) -> bytes:
        """line clearsigned by key (the maintainer's by default), made at time `at`."""
        faked = ["--faked-system-time", _stamp(at) + "!"] if at is not None else []
        signed = _gpg(
            self.home, *faked, "--local-user", key or self.maintainer, "--clearsign",
            data=line + "\n",
        )  # fmt: skip
        return signed.encode("ascii")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    made = _stamp(time.time() - 10 * DAY)  # old enough to sign in the past

    def new_key(uid: str) -> str:
        _gpg(home, "--faked-system-time", made, "--passphrase", "", "--quick-gen-key", uid,
             "ed25519", "sign", "never")  # fmt: skip
        listing = _gpg(home, "--with-colons", "--list-keys", uid)
        return next(line.split(":")[9] for line in listing.splitlines() if line[:4] == "fpr:")

    return Keys(
        home,
        new_key("Maintainer <maintainer@example.org>"),
        new_key("Limited <limited@example.org>"),
        new_key("Intruder <intruder@example.org>"),
    )


@dataclass
class Setup:
    qube: Qube
    keys: Keys
    builder: Path
    commit: str

    def send(self, message: bytes) -> subprocess.CompletedProcess[bytes]:
        return self.qube.call(COMMAND, data=message)

    def last_decision(self) -> str:
        return self.qube.decisions()[-1]

    def records(self) -> list[str]:
        path = self.builder / "commands.log"
        return path.read_text().splitlines() if path.exists() else []

    def wait_done(self, count: int) -> None:
        """Until `count` actions have ended (their log's last line)."""
        wait_for(
            lambda: sum("done" in p.read_text() for p in self.qube.action_logs()) == count,
            f"{count} actions",
        )


@pytest.fixture
def setup(tmp_path: Path, keys: Keys) -> Iterator[Setup]:
    qube = make_qube(tmp_path)
    builder = make_builder(tmp_path / "builder", "COMPONENTS = core-admin gui-daemon\n")
    sources = builder / "qubes-src/core-admin"
    sources.mkdir(parents=True)
    git = ["git", "-C", str(sources), "-c", "user.name=dev", "-c", "user.email=dev@example.org"]
    subprocess.run([*git, "init", "--quiet"], check=True)
    subprocess.run([*git, "commit", "--quiet", "--allow-empty", "-m", "v1.0"], check=True)
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    keyring = qube.home / "trusted-keys-for-commands.gpg"
    exported = subprocess.run(
        ["gpg", "--homedir", str(keys.home), "--batch", "--export", keys.maintainer, keys.limited],
        capture_output=True,
        check=True,
    ).stdout
    keyring.write_bytes(exported)
    qube.builders(f"r4.2={builder}")
    qube.settings(
        signers={
            keys.maintainer: {
                "components": ["core-admin"],
                "distributions": ["vm-bookworm", "host-fc37"],
                "templates": ["fedora-41-xfce"],
                "iso": True,
            },
            keys.limited: {"components": ["gui-daemon"], "distributions": ["_all_"]},
        }
    )
    yield Setup(qube, keys, builder, commit)


def upload(setup: Setup, distributions: str = "vm-bookworm", commit: str | None = None) -> str:
    return f"Upload-component r4.2 core-admin {commit or setup.commit} current {distributions}"


def template_stamp(offset: float = 0) -> str:
    return time.strftime("%Y%m%d%H%M", time.gmtime(time.time() + offset))


def test_an_upload_runs_once_and_its_copy_is_replayed(setup: Setup) -> None:
    message = setup.keys.sign(upload(setup, "vm-bookworm host-fc37"))
    first = setup.send(message)
    assert first.returncode == 0 and first.stdout == b"", first.stderr
    assert "accepted from sys-net: Upload-component" in setup.qube.decisions()[0]
    setup.wait_done(1)
    variables = "COMPONENTS=core-admin DISTS_VM=bookworm DIST_DOM0=fc37"
    assert setup.records() == [
        f"update-repo-current {variables} MAKEREPO=1 UPLOAD=0",
        f"update-repo-current {variables} MAKEREPO=0 UPLOAD=1",
    ]
    again = setup.send(message)
    assert again.returncode == 1
    assert setup.last_decision().endswith(
        f"refused from sys-net: replayed: Upload-component signed by {setup.keys.maintainer}"
        " already ran"
    )
    # Armour a copier may change without the key (a comment header, CRLF line ends) is the
    # same command.
    text = message.decode()
    commented = text.replace("-----BEGIN PGP SIGNATURE-----\n",
                             "-----BEGIN PGP SIGNATURE-----\nComment: again\n")  # fmt: skip
    for copy in (commented, text.replace("\n", "\r\n")):
        assert setup.send(copy.encode()).returncode == 1
        assert "replayed" in setup.last_decision()
    time.sleep(0.5)
    assert len(setup.records()) == 2 and len(setup.qube.action_logs()) == 1


def test_the_same_line_signed_again_is_a_new_command(setup: Setup) -> None:
    line = upload(setup)
    assert setup.send(setup.keys.sign(line, at=time.time() - 60)).returncode == 0
    assert setup.send(setup.keys.sign(line)).returncode == 0
    setup.wait_done(2)
    assert len(setup.records()) == 4


def test_all_distributions_are_the_signers_own(setup: Setup) -> None:
    assert setup.send(setup.keys.sign(upload(setup, "all"))).returncode == 0
    setup.wait_done(1)
    assert "DISTS_VM=bookworm DIST_DOM0=fc37" in setup.records()[0]


def test_an_upload_streams_its_output_to_the_build_log_command(
    setup: Setup, tmp_path: Path
) -> None:
    """The build log command reaches make-with-log in its environment (the world's stand-in reads
    it there, as qubes-builder's does): both passes of the upload stream to it, and to the
    action's own log."""
    received = tmp_path / "received"
    setup.qube.settings(build_log_command=f"cat >> {received}")
    assert setup.send(setup.keys.sign(upload(setup))).returncode == 0
    wait_for(lambda: len(setup.qube.action_logs()) == 1, "the upload's log")
    [output] = setup.qube.action_logs()
    # The action's own last line: make-with-log's "> done" lines come before it.
    ended = re.compile(r"^[0-9-]{10} [0-9:]{8} done$", re.MULTILINE)
    wait_for(lambda: ended.search(output.read_text()), "the end of the upload")
    variables = "COMPONENTS=core-admin DISTS_VM=bookworm DIST_DOM0="
    requests = [
        f"update-repo-current {variables} MAKEREPO=1 UPLOAD=0",
        f"update-repo-current {variables} MAKEREPO=0 UPLOAD=1",
    ]
    assert setup.records() == requests
    logged = received.read_text().splitlines()
    assert logged == [
        line
        for request in requests
        for line in (
            "> starting build with log",
            ">> make args: update-repo-current",
            "> running make",
            request,
            "> done",
        )
    ]
    assert all(request in output.read_text() for request in requests)


def test_a_template_build_runs_with_the_build_log_command(setup: Setup) -> None:
    (setup.builder / "scripts/auto-build-template").write_text(LOG_COMMAND_BUILD)
    setup.qube.settings(build_log_command="qrexec-client-vm dom0 qubesbuilder.BuildLog")
    message = setup.keys.sign(f"Build-template r4.2 fedora-41-xfce {template_stamp()}")
    assert setup.send(message).returncode == 0
    setup.wait_done(1)
    seen = (setup.builder / "log-command").read_text()
    assert seen == "qrexec-client-vm dom0 qubesbuilder.BuildLog\n"


def test_an_upload_of_another_commit_runs_nothing(setup: Setup) -> None:
    """qubes-builder-github's Upload: the commit must be the built HEAD of the component."""
    result = setup.send(setup.keys.sign(upload(setup, commit="0" * 40)))
    assert result.returncode == 0
    decisions = setup.qube.decisions()
    assert f"core-admin in {setup.builder} is at {setup.commit}, not at the signed" in decisions[1]
    assert decisions[2].endswith("no builder here takes it: nothing run")
    assert setup.records() == []


def test_an_unsigned_command_runs_nothing(setup: Setup) -> None:
    assert setup.send(upload(setup).encode() + b"\n").returncode == 1
    assert "refused from sys-net: unsigned command:" in setup.last_decision()
    assert setup.records() == []


def test_a_command_signed_by_an_untrusted_key_runs_nothing(setup: Setup) -> None:
    message = setup.keys.sign(upload(setup), key=setup.keys.intruder)
    assert setup.send(message).returncode == 1
    assert "refused from sys-net: untrusted signer: key " in setup.last_decision()
    assert "is not in the trusted keyring" in setup.last_decision()
    assert setup.records() == []


def test_a_key_in_the_keyring_but_not_a_signer_is_untrusted(setup: Setup) -> None:
    setup.qube.settings(signers={})
    assert setup.send(setup.keys.sign(upload(setup))).returncode == 1
    assert f"untrusted signer {setup.keys.maintainer}" in setup.last_decision()


def test_a_changed_command_has_a_bad_signature(setup: Setup) -> None:
    message = setup.keys.sign(upload(setup)).replace(b" current ", b" security-testing ")
    assert setup.send(message).returncode == 1
    assert setup.last_decision().endswith("refused from sys-net: bad signature")
    assert setup.records() == []


def test_an_old_signature_is_stale(setup: Setup) -> None:
    message = setup.keys.sign(upload(setup), at=time.time() - 2 * DAY)
    assert setup.send(message).returncode == 1
    assert "refused from sys-net: stale signature: made " in setup.last_decision()
    assert "(limit 86400s)" in setup.last_decision()
    assert setup.records() == []


@pytest.mark.parametrize("offset", [-2 * 3600, 3600])
def test_a_template_timestamp_outside_the_window_is_stale(setup: Setup, offset: int) -> None:
    """qubes-builderv2-github's dispatch: Build-template within [now - 1h, now + 5min]."""
    stamp = template_stamp(offset)
    message = setup.keys.sign(f"Build-template r4.2 fedora-41-xfce {stamp}")
    assert setup.send(message).returncode == 1
    assert f"stale timestamp {stamp}" in setup.last_decision()
    assert setup.records() == []


def test_a_fresh_template_build_runs(setup: Setup) -> None:
    stamp = template_stamp()
    message = setup.keys.sign(f"Build-template r4.2 fedora-41-xfce {stamp}")
    assert setup.send(message).returncode == 0
    setup.wait_done(1)
    assert setup.records() == [f"auto-build-template fedora-41-xfce {stamp}"]


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ("Upload-component r4.2 gui-daemon {commit} current all", None,
         "may not upload component gui-daemon"),
        ("Upload-component r4.2 core-admin {commit} current all", "limited",
         "may not upload component core-admin"),
        ("Upload-component r4.2 core-admin {commit} current vm-fc41", None,
         "not authorised for distribution vm-fc41"),
        ("Build-template r4.2 debian-12 {stamp}", None, "may not Build-template debian-12"),
        ("Build-iso r4.2 4.2.4 {stamp}", "limited", "may not build ISOs"),
    ],
)  # fmt: skip
def test_an_unauthorised_command_runs_nothing(
    setup: Setup, line: str, key: str | None, reason: str
) -> None:
    text = line.format(commit=setup.commit, stamp=template_stamp())
    signer = setup.keys.limited if key == "limited" else None
    assert setup.send(setup.keys.sign(text, key=signer)).returncode == 1
    assert "refused from sys-net: not authorised" in setup.last_decision()
    assert reason in setup.last_decision()
    assert setup.records() == []


def test_iso_builds_need_qubes_builderv2(setup: Setup) -> None:
    """Only qubes-builderv2 builds ISOs, and the collection does not run it yet."""
    assert setup.send(setup.keys.sign(f"Build-iso r4.2 4.2.4 {template_stamp()}")).returncode == 0
    assert "does not build ISOs (qubes-builderv2 does" in setup.qube.decisions()[1]
    assert setup.records() == []


def test_a_command_for_another_release_runs_nothing(setup: Setup) -> None:
    assert setup.send(setup.keys.sign(upload(setup).replace("r4.2", "r4.3"))).returncode == 0
    assert f"{setup.builder} builds release r4.2" in setup.qube.decisions()[1]
    assert setup.records() == []


def test_a_caller_other_than_the_net_qube_is_refused(setup: Setup) -> None:
    result = setup.qube.call(COMMAND, source="build-kernel", data=setup.keys.sign(upload(setup)))
    assert result.returncode == 1
    assert setup.last_decision().endswith("refused: caller 'build-kernel' is not allowed")


def test_size_and_grammar_come_before_any_cryptography(setup: Setup) -> None:
    """Without a keyring every signature check fails: only the grammar can refuse these."""
    (setup.qube.home / "trusted-keys-for-commands.gpg").unlink()
    good = setup.keys.sign(upload(setup))
    for message, reason in (
        (good + b"\n" * (8193 - len(good)), "over 8192 bytes"),
        (good.replace(b"core-admin", b"core-admin\xc3\xa9"), "not ASCII"),
        (good.replace(b" current ", b" current  "), "single spaces"),
    ):
        assert setup.send(message).returncode == 1
        assert "refused from sys-net: malformed command: " in setup.last_decision()
        assert reason in setup.last_decision()
    assert setup.send(good).returncode == 1
    assert "untrusted signer: there is no trusted keyring" in setup.last_decision()


SIGNATURE = "-----BEGIN PGP SIGNATURE-----\n\niHUEARYKAB0WIQ\n=kMF5\n-----END PGP SIGNATURE-----\n"


def _message(command: str, hash_header: str = "Hash: SHA256", signature: str = SIGNATURE) -> bytes:
    return f"-----BEGIN PGP SIGNED MESSAGE-----\n{hash_header}\n\n{command}\n{signature}".encode()


@pytest.mark.parametrize(
    ("data", "rule"),
    [
        (_message("Upload-component r4.2 a " + "0" * 40 + " current all", "Hash: MD5"),
         "one Hash: header"),
        (_message("Build-iso r4.2 4.2 202601010000\nsecond line"), "exactly one command line"),
        (_message("x" * 256), "over 255 bytes"),
        (_message("Build-iso r4.2 -4.2 202601010000"), "none starting with '-'"),
        (_message("Build-iso r4.2 4.2 202601010000", signature=SIGNATURE[:-28]),
         "does not end with"),
        (_message("Build-iso r4.2 4.2 202601010000", signature=SIGNATURE.replace("iHU", "i$U")),
         "not base64 armour"),
        (_message("Build-iso r4.2 4.2 202601010000") + b"trailing text\n", "does not end with"),
        (b"Upload-component r4.2 a b current all\n", "not an inline-signed"),
    ],
)  # fmt: skip
def test_message_grammar(data: bytes, rule: str) -> None:
    with pytest.raises(command_grammar.Malformed, match=rule):
        command_grammar.parse_message(data)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        ("Upload r4.2 core-admin", "unknown command 'Upload'"),
        ("Build-iso r4.2 4.2", "takes 3 arguments, not 2"),
        (f"Upload-component 4.2 core-admin {COMMIT} current all", "release '4.2'"),
        (f"Upload-component r4.2 core.admin {COMMIT} current all", "component 'core.admin'"),
        (f"Upload-component r4.2 {'c' * 65} {COMMIT} current all", "component 'ccc"),
        (f"Upload-component r4.2 -core {COMMIT} current all", "component '-core'"),
        (f"Upload-component r4.2 core-admin {COMMIT[:39]} current all", "commit"),
        (f"Upload-component r4.2 core-admin {COMMIT.upper()} current all", "commit"),
        (f"Upload-component r4.2 core-admin {COMMIT} testing all", "not one of current"),
        (f"Upload-component r4.2 core-admin {COMMIT} current fc41", "distribution 'fc41'"),
        (f"Upload-component r4.2 core-admin {COMMIT} current vm-a vm-a", "name one twice"),
        (f"Upload-component r4.2 core-admin {COMMIT} current vm-Fc41", "distribution 'vm-Fc41'"),
        (f"Upload-component r4.2 core-admin {COMMIT} current", "takes 5 arguments, not 4"),
        ("Build-template r4.2 fedora.41 202601010000", "template 'fedora.41'"),
        ("Build-template r4.2 fedora-41 2026010100", "timestamp '2026010100'"),
        ("Upload-template r4.2 fedora-41 4.2.0-2026 templates-itl", "template version"),
        ("Upload-template r4.2 fedora-41 4.2.0-202601010000 current", "not one of templates-itl"),
        # Each rule is matched whole: a trailing newline is not the end of a word.
        (f"Upload-component r4.2\n core-admin {COMMIT} current all", "release 'r4.2\\\\n'"),
        (f"Upload-component r4.2 core-admin\n {COMMIT} current all", "component 'core-admin\\\\n'"),
        (f"Upload-component r4.2 core-admin {COMMIT}\n current all", "commit"),
        (f"Upload-component r4.2 core-admin {COMMIT} current vm-a\n", "distribution 'vm-a\\\\n'"),
        ("Build-template r4.2 fedora-41 202601010000\n", "timestamp '202601010000\\\\n'"),
        ("Build-template r4.2 fedora-41\n 202601010000", "template 'fedora-41\\\\n'"),
        ("Build-iso r4.3 4.3.0\n 202601010000", "iso version '4.3.0\\\\n'"),
    ],
)
def test_command_grammar(line: str, rule: str) -> None:
    with pytest.raises(command_grammar.Malformed, match=rule.replace(".", r"\.")):
        command_grammar.parse_command(line)


def test_the_four_commands_parse() -> None:
    parse = command_grammar.parse_command
    upload_command = parse(
        f"Upload-component r4.2 core-admin {COMMIT} security-testing vm-fc41 host-fc37"
    )
    assert upload_command.component == "core-admin"
    assert upload_command.distributions == ("vm-fc41", "host-fc37")
    assert parse(f"Upload-component r4.2 core-admin {COMMIT} current all").all_distributions
    assert parse("Build-template r4.3 debian-12-minimal 202601010000").template == (
        "debian-12-minimal"
    )
    assert parse("Upload-template r4.2 fedora-41 4.2.0-202601010000 templates-itl").version == (
        "4.2.0-202601010000"
    )
    assert parse("Build-iso r4.3 4.3.0-rc1 202601010000").version == "4.3.0-rc1"


def test_the_store_of_used_commands_is_pruned_and_bounded(tmp_path: Path) -> None:
    store = str(tmp_path / "state/used.json")
    now = 10 * DAY
    consume = used_commands.consume
    assert consume(store, "a", now - DAY, now, DAY, 2)
    assert not consume(store, "a", now - DAY, now, DAY, 2)
    assert consume(store, "b", now, now, DAY, 2)
    with pytest.raises(used_commands.StoreError, match="holds 2 live commands"):
        consume(store, "c", now, now, DAY, 2)
    later = now + DAY // 2 + used_commands.CLOCK_MARGIN
    # "a" can only come back stale now: it is dropped, which makes room.
    assert consume(store, "c", later, later, DAY, 2)
    assert set(json.loads(Path(store).read_text())) == {"b", "c"}


def test_an_unreadable_store_refuses_every_command(setup: Setup) -> None:
    store = setup.qube.home / "state/used-commands.json"
    store.parent.mkdir()
    store.write_text("{not json")
    assert setup.send(setup.keys.sign(upload(setup))).returncode == 1
    assert "the store of used commands" in setup.last_decision()
    assert "is unreadable" in setup.last_decision()
    assert setup.records() == []
