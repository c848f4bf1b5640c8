"""qubesim's screen on a folder of this machine: the questions that the guest's zenity stand-in
leaves, read and answered by dom0's side as it reads a qube's (every file there untrusted)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import ModuleType

import pytest

from qubesim import screen

ZENITY = Path(screen.__file__).parent / "guest" / "zenity"
TEXT = (
    "Do you allow VM 'build-fedora' to access your GPG keys\\n"
    "(now and for the following 5 minutes)?"
)


def _zenity() -> ModuleType:
    loader = SourceFileLoader("qubesim_guest_zenity", str(ZENITY))
    spec = spec_from_loader(loader.name, loader)
    assert spec is not None
    module = module_from_spec(spec)
    loader.exec_module(module)
    return module


zenity = _zenity()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.fixture
def asked(folder: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    """A question put up by zenity --question (token, the lock zenity holds while it waits)."""
    monkeypatch.setenv("QREXEC_REMOTE_DOMAIN", "build-fedora")
    given = zenity.parse(["--question", "--no-wrap", "--text", TEXT])
    token, lock = zenity.post(folder, given)
    yield token, lock
    os.close(lock)


def test_a_question_is_read_as_zenity_shows_it_and_pending_while_zenity_waits(
    folder: int, asked: tuple[str, int]
) -> None:
    token, _ = asked
    question = screen._question("keys-fedora", folder, token)
    assert question is not None
    assert (question.id, question.qube, question.caller, question.state) == (
        f"keys-fedora:{token}",
        "keys-fedora",
        "build-fedora",
        "pending",
    )
    assert question.text == TEXT.replace("\\n", "\n")


def test_a_question_nobody_waits_for_is_abandoned_and_takes_no_answer(folder: int) -> None:
    token, lock = zenity.post(folder, zenity.parse(["--question", "--text=x"]))
    os.close(lock)
    question = screen._question("keys-fedora", folder, token)
    assert question is not None and question.state == "abandoned"
    with pytest.raises(screen.QuestionError, match="nobody waits"):
        screen._answer(folder, question.id, token, "yes")


@pytest.mark.parametrize(("reply", "result"), [("yes", True), ("no", False)])
def test_the_answer_reaches_the_waiting_zenity_once(
    folder: int, asked: tuple[str, int], reply: str, result: bool
) -> None:
    token, _ = asked
    heard: list[bool] = []
    waiting = threading.Thread(target=lambda: heard.append(zenity.wait_for_answer(folder, token)))
    waiting.start()
    screen._answer(folder, f"keys-fedora:{token}", token, reply)
    waiting.join(timeout=10)
    assert heard == [result]
    question = screen._question("keys-fedora", folder, token)
    assert question is not None and question.state == reply
    with pytest.raises(screen.QuestionError, match="answered already"):
        screen._answer(folder, f"keys-fedora:{token}", token, "yes")


def _plant(tmp_path: Path, token: str, record: object) -> None:
    (tmp_path / f"{token}.question").write_text(json.dumps(record))


@pytest.mark.parametrize(
    "record",
    [
        {"time": 1.0, "caller": "../../etc", "text": "x"},
        {"time": 1.0, "caller": "a" * 32, "text": "x"},
        {"time": float("inf"), "caller": "build-fedora", "text": "x"},
        {"time": 1.0, "caller": "build-fedora", "text": "x" * (screen.TEXT_MAX + 1)},
        {"time": 1.0, "caller": "build-fedora", "text": 3},
        ["not", "an", "object"],
    ],
)
def test_malformed_questions_are_left_out(tmp_path: Path, folder: int, record: object) -> None:
    _plant(tmp_path, "0" * 16, record)
    assert screen._question("keys-fedora", folder, "0" * 16) is None


def test_links_other_files_and_too_many_entries_are_left_out(tmp_path: Path, folder: int) -> None:
    outside = tmp_path.parent / "outside.json"
    outside.write_text(json.dumps({"time": 1.0, "caller": "", "text": "x"}))
    (tmp_path / f"{'1' * 16}.question").symlink_to(outside)
    os.mkfifo(tmp_path / f"{'2' * 16}.question")
    (tmp_path / f"{'3' * 16}.question").write_bytes(b"{" * (screen.QUESTION_MAX_BYTES + 1))
    for token in ("1" * 16, "2" * 16, "3" * 16):
        assert screen._question("keys-fedora", folder, token) is None
    for number in range(screen.ENTRIES_MAX + 10):
        (tmp_path / f"{number:016x}.question").touch()
    assert len(screen._tokens(folder)) <= screen.ENTRIES_MAX


def test_a_planted_answer_link_is_not_followed(tmp_path: Path, folder: int) -> None:
    token, lock = zenity.post(folder, zenity.parse(["--question", "--text=x"]))
    target = tmp_path.parent / "dom0-file"
    (tmp_path / f"{token}.answer").symlink_to(target)
    try:
        with pytest.raises(screen.QuestionError):
            screen._answer(folder, f"keys-fedora:{token}", token, "yes")
    finally:
        os.close(lock)
    assert not target.exists()


@pytest.mark.parametrize(
    "question_id", ["keys-fedora", "keys-fedora:xyz", "../x:" + "0" * 16, "k:" + "0" * 17]
)
def test_question_ids_are_checked(question_id: str) -> None:
    with pytest.raises(screen.UsageError):
        screen._parse_id(question_id)


@pytest.mark.parametrize(
    "arguments", [["--info", "--text=x"], ["--question", "--timeout=5"], ["--text=x"], []]
)
def test_zenity_has_the_question_dialog_only(arguments: list[str]) -> None:
    with pytest.raises(zenity.Unavailable):
        zenity.parse(arguments)


def test_zenity_reads_backslash_escapes_as_g_strcompress() -> None:
    assert zenity.compress(r"a\nb\tc\\d\101\q") == "a\nb\tc\\dAq"
