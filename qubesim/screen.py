"""qubesim's screen, seen from dom0: the questions qubes ask a person (zenity --question), listed
and answered.

In Qubes such a question is a window in the asking qube, and the person at the screen answers it.
qubesim has no screen: the qube's zenity (qubesim/guest/zenity) leaves its question as a file in
the qube's /run/qubesim-screen and waits; dom0 reads it through the running qube's root
(/proc/PID/root) and answers by creating the answer file next to it.

Everything in that folder is the qube's and untrusted: dom0 opens each path component without
following symbolic links (through /proc/PID/root an absolute link would resolve in dom0's root),
reads only regular files of bounded size, at most ENTRIES_MAX entries per qube, and keeps only
well-formed fields. Which qube shows a question is known from whose root the file is in, never
from what the file says.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from qubesim.errors import QubesimError, UsageError
from qubesim.layout import Layout
from qubesim.model import Database
from qubesim.runtime import Runtime

SCREEN = ("run", "qubesim-screen")  # in a qube's root
QUESTION = ".question"
ANSWER = ".answer"
QUESTION_MAX_BYTES = 16384
TEXT_MAX = 4096
ENTRIES_MAX = 256
ANSWERS = ("yes", "no")
PENDING, ABANDONED = "pending", "abandoned"
_TOKEN = re.compile(r"[0-9a-f]{16}")
_QUBE = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]{0,30}")
_LATEST_TIME = 2.0**34  # far beyond any clock this runs on; a bound for an untrusted number


@dataclass(frozen=True)
class Question:
    id: str  # QUBE:TOKEN
    qube: str  # the qube that shows the question (a keys qube for split-GPG): known to dom0
    caller: str  # the qrexec caller it is about, as that qube says (a qube name, or empty)
    time: str
    title: str
    text: str
    state: str  # pending | yes | no | abandoned (nobody waits for an answer any more)


class QuestionError(QubesimError):
    pass


# -- reading a qube's files safely -----------------------------------------------------------------
def _open_screen(pid: int) -> int:
    """The screen folder in the root of the qube whose pid 1 is `pid`; OSError if it has none."""
    fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in SCREEN:
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    except OSError:
        os.close(fd)
        raise
    return fd


def _open_file(screen: int, name: str) -> int | None:
    """A regular file of the screen folder, open for reading; None if there is none."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=screen)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _read(fd: int, limit: int) -> bytes | None:
    data = os.read(fd, limit + 1)
    return data if len(data) <= limit else None


def _tokens(screen: int) -> list[str]:
    """The tokens of the questions in the folder, from its first ENTRIES_MAX entries."""
    tokens = []
    with os.scandir(screen) as entries:
        for count, entry in enumerate(entries):
            if count >= ENTRIES_MAX:
                break
            token = entry.name.removesuffix(QUESTION)
            if entry.name.endswith(QUESTION) and _TOKEN.fullmatch(token):
                tokens.append(token)
    return tokens


# -- questions -------------------------------------------------------------------------------------
def _fields(data: bytes) -> tuple[float, str, str, str] | None:
    """(time, caller, title, text) of a question file, or None if it is not well formed."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    moment, caller = record.get("time"), record.get("caller")
    title, text = record.get("title", ""), record.get("text")
    if not isinstance(moment, int | float) or not math.isfinite(moment):
        return None
    if not 0 < moment < _LATEST_TIME or not isinstance(caller, str):
        return None
    if caller and not _QUBE.fullmatch(caller):
        return None
    if not all(isinstance(value, str) and len(value) <= TEXT_MAX for value in (title, text)):
        return None
    return float(moment), caller, title, text


def _answer_given(screen: int, token: str) -> str | None:
    fd = _open_file(screen, token + ANSWER)
    if fd is None:
        return None
    try:
        # zenity takes anything but "yes" for a no.
        return "yes" if (_read(fd, 16) or b"").strip() == b"yes" else "no"
    finally:
        os.close(fd)


def _waited_for(fd: int) -> bool:
    """Whether the asking zenity still holds the question's lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _question(qube: str, screen: int, token: str) -> Question | None:
    fd = _open_file(screen, token + QUESTION)
    if fd is None:
        return None
    try:
        data = _read(fd, QUESTION_MAX_BYTES)
        fields = _fields(data) if data is not None else None
        if fields is None:
            return None
        state = _answer_given(screen, token) or (PENDING if _waited_for(fd) else ABANDONED)
    finally:
        os.close(fd)
    moment, caller, title, text = fields
    when = datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")
    return Question(f"{qube}:{token}", qube, caller, when, title, text, state)


def _running_qubes(layout: Layout) -> Iterator[tuple[str, int]]:
    if not layout.database.exists():
        return
    runtime = Runtime(layout)
    for name in Database(layout).read().names():
        running = runtime.running(name)
        if running is not None:
            yield name, running.pid


def _questions_of(qube: str, pid: int) -> list[Question]:
    try:
        screen = _open_screen(pid)
    except OSError:
        return []  # gone, or a qube without qubesim's screen
    try:
        found = [_question(qube, screen, token) for token in _tokens(screen)]
    finally:
        os.close(screen)
    return [question for question in found if question is not None]


def questions(layout: Layout) -> list[Question]:
    """Every question on the screens of the running qubes, oldest first."""
    found = [q for name, pid in _running_qubes(layout) for q in _questions_of(name, pid)]
    return sorted(found, key=lambda question: (question.time, question.id))


# -- answering -------------------------------------------------------------------------------------
def _parse_id(question_id: str) -> tuple[str, str]:
    qube, _, token = question_id.partition(":")
    if not _QUBE.fullmatch(qube) or not _TOKEN.fullmatch(token):
        raise UsageError(f"not a question id (QUBE:TOKEN, as `qubesim questions` lists them): "
                         f"{question_id[:80]!r}")  # fmt: skip
    return qube, token


def answer(layout: Layout, question_id: str, reply: str) -> None:
    """Answer a pending question, as the person at the screen would."""
    if reply not in ANSWERS:
        raise UsageError(f"the answer is yes or no, not {reply[:20]!r}")
    qube, token = _parse_id(question_id)
    pid = dict(_running_qubes(layout)).get(qube)
    if pid is None:
        raise QuestionError(f"no question {question_id}: {qube} does not run")
    try:
        screen = _open_screen(pid)
    except OSError:
        raise QuestionError(f"no question {question_id}: {qube} has no screen") from None
    try:
        _answer(screen, question_id, token, reply)
    finally:
        os.close(screen)


def _answer(screen: int, question_id: str, token: str, reply: str) -> None:
    fd = _open_file(screen, token + QUESTION)
    if fd is None:
        raise QuestionError(f"no question {question_id}")
    try:
        if _answer_given(screen, token) is not None:
            raise QuestionError(f"question {question_id} is answered already")
        if not _waited_for(fd):
            raise QuestionError(f"question {question_id}: nobody waits for its answer any more")
    finally:
        os.close(fd)
    _publish(screen, token + ANSWER, f"{reply}\n".encode(), question_id)


def _publish(screen: int, name: str, data: bytes, question_id: str) -> None:
    """Create `name` whole or not at all (the asking zenity reads it as soon as it exists): the
    data is written aside, then linked in place, which fails if an answer is there already."""
    aside = f".{secrets.token_hex(8)}{ANSWER}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    with os.fdopen(os.open(aside, flags, 0o644, dir_fd=screen), "wb") as file:
        file.write(data)
    try:
        os.link(aside, name, src_dir_fd=screen, dst_dir_fd=screen, follow_symlinks=False)
    except FileExistsError:
        raise QuestionError(f"question {question_id} is answered already") from None
    finally:
        os.unlink(aside, dir_fd=screen)


def format_question(question: Question) -> str:
    return (
        f"{question.id} {question.time} {question.qube} {question.caller or '-'} {question.state}"
    )
