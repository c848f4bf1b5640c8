# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
name: qubes
short_description: Run tasks in Qubes OS qubes over qrexec
version_added: 0.1.0
description:
  - Runs commands and transfers files in a qube through one qrexec stream to C(qubes.VMShell)
    (or C(qubes.VMRootShell) for O(remote_user=root)); nothing else is needed in the qube but
    C(python3).
  - From dom0 the stream is made with C(qvm-run); from an admin qube with C(qrexec-client-vm)
    (dom0 policy must allow C(qubes.VMShell) to the qube).
  - A small agent in the qube serves framed requests, so commands never mix with their input
    (unread input is never executed), file paths are never interpreted by a shell, and transfers
    stream in constant memory with an atomic rename into place.
  - With O(persist), one stream per qube and user stays open between tasks (like ssh's
    ControlPersist) behind a local socket that only the controller's user can reach.
  - With the P(qubes_infra.build.qubes#become) become method, a task with C(become) runs over a
    stream opened as the become user (C(qubes.VMRootShell) for root), with no sudo in the qube, as
    Qubes' minimal templates need. Any other become method (sudo, su) runs in the qube as usual.
  - A missing, halted (with O(autostart=false)) or refused qube, or a broken stream, is reported
    as unreachable; a command's own failure is the command's. A handshake tells them apart.
  - The qube is not trusted. Every wait on it has a deadline, what it sends is capped
    (O(output_limit), O(fetch_limit)), and its text is made printable before it is shown.
    Facts it returns never choose the connection, see the notes.
notes:
  - Which qube, which user, which transport and every timeout and limit come from the inventory,
    the play and the configuration. Ansible itself drops C(ansible_host), C(ansible_user) and
    C(ansible_connection) from module facts, but not the C(ansible_qubes_*) variables, and facts
    outrank inventory variables. So when a host's facts carry any of them (only a misbehaving or
    compromised qube returns such facts), its tasks fail with a message naming them instead of
    running with values the qube chose. Clear the host's facts once the qube is trusted again
    (the C(clear_facts) meta task, or the fact cache).
options:
  remote_addr:
    description: The qube to run in.
    type: str
    default: inventory_hostname
    vars:
      - name: inventory_hostname
      - name: ansible_host
      - name: ansible_qubes_name
  remote_user:
    description:
      - The user to run as in the qube. V(root) uses C(qubes.VMRootShell), without sudo, asking
        for root (C(qvm-run --user root)) as Qubes 4.2 needs (4.3 forces root for that service).
      - Unset means the qube's default user. From an admin qube only the default user and
        V(root) are possible, and the policy rule for C(qubes.VMRootShell) names C(user=root).
    type: str
    vars:
      - name: ansible_user
    env:
      - name: ANSIBLE_REMOTE_USER
    ini:
      - section: defaults
        key: remote_user
    keyword:
      - name: remote_user
  autostart:
    description: Start a halted qube. When false, a halted qube is unreachable.
    type: bool
    default: true
    vars:
      - name: ansible_qubes_autostart
    env:
      - name: ANSIBLE_QUBES_AUTOSTART
    ini:
      - section: qubes_connection
        key: autostart
  connect_timeout:
    description:
      - Seconds to wait for the qube's agent, including starting the qube; a failed start is
        ended (its processes killed) within the same time.
      - Also the longest time the qube may leave its input unread; then the stream is closed.
    type: int
    default: 120
    vars:
      - name: ansible_qubes_connect_timeout
    env:
      - name: ANSIBLE_QUBES_CONNECT_TIMEOUT
    ini:
      - section: qubes_connection
        key: connect_timeout
  command_timeout:
    description:
      - Seconds a command may run; then it is killed in the qube (its whole process group) and
        the task fails. V(0) means no limit.
    type: int
    default: 0
    vars:
      - name: ansible_qubes_command_timeout
    env:
      - name: ANSIBLE_QUBES_COMMAND_TIMEOUT
    ini:
      - section: qubes_connection
        key: command_timeout
  transfer_timeout:
    description:
      - Seconds one file transfer (put or fetch) may take; then it is stopped, its partial file
        removed, and the task fails. V(0) means no limit.
    type: int
    default: 900
    vars:
      - name: ansible_qubes_transfer_timeout
    env:
      - name: ANSIBLE_QUBES_TRANSFER_TIMEOUT
    ini:
      - section: qubes_connection
        key: transfer_timeout
  output_limit:
    description:
      - MiB of output (stdout and stderr together) one command may return to the controller; past
        it the command is killed and the task fails saying so. V(0) means no limit.
    type: int
    default: 64
    vars:
      - name: ansible_qubes_output_limit
    env:
      - name: ANSIBLE_QUBES_OUTPUT_LIMIT
    ini:
      - section: qubes_connection
        key: output_limit
  fetch_limit:
    description:
      - MiB one fetched file may have; past it the fetch is stopped, the partial file removed,
        and the task fails saying so. V(0) means no limit.
    type: int
    default: 4096
    vars:
      - name: ansible_qubes_fetch_limit
    env:
      - name: ANSIBLE_QUBES_FETCH_LIMIT
    ini:
      - section: qubes_connection
        key: fetch_limit
  persist:
    description: Keep one stream per qube and user open between tasks.
    type: bool
    default: true
    vars:
      - name: ansible_qubes_persist
    env:
      - name: ANSIBLE_QUBES_PERSIST
    ini:
      - section: qubes_connection
        key: persist
  persist_idle:
    description: Seconds a persistent stream stays open without requests.
    type: int
    default: 60
    vars:
      - name: ansible_qubes_persist_idle
    env:
      - name: ANSIBLE_QUBES_PERSIST_IDLE
    ini:
      - section: qubes_connection
        key: persist_idle
  transport:
    description:
      - How to reach the qube. V(auto) uses C(qrexec-client-vm) where it exists (an admin qube)
        and C(qvm-run) otherwise (dom0).
    type: str
    default: auto
    choices: [auto, qvm-run, qrexec-client-vm]
    vars:
      - name: ansible_qubes_transport
    env:
      - name: ANSIBLE_QUBES_TRANSPORT
    ini:
      - section: qubes_connection
        key: transport
  pipelining:
    description: Send modules on the command's stdin instead of as files. It is safe here.
    type: bool
    default: true
    vars:
      - name: ansible_pipelining
      - name: ansible_qubes_pipelining
    env:
      - name: ANSIBLE_QUBES_PIPELINING
    ini:
      - section: qubes_connection
        key: pipelining
"""

EXAMPLES = r"""
# inventory: every qube of a group through qrexec, as root without sudo
build_vms:
  hosts:
    build-fedora:
  vars:
    ansible_connection: qubes_infra.build.qubes
    ansible_user: root
    ansible_qubes_command_timeout: 3600
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ansible import constants as C
from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display
from ansible_collections.qubes_infra.build.plugins.become import qubes as become_qubes
from ansible_collections.qubes_infra.build.plugins.plugin_utils import (
    qubes_agent,
    qubes_client,
    qubes_multiplexer,
    qubes_transport,
)
from ansible_collections.qubes_infra.build.plugins.plugin_utils.qubes_agent import ChannelError

display = Display()

CONTROL_DIRECTORY = "~/.ansible/cp"
# Characters of a qube's text (stderr, error messages) shown to the operator at most.
SHOWN = 300
# Seconds beyond connect_timeout that a start may take (the multiplexer's own start and end).
START_SLACK = 15
MIB = 1 << 20
# The variables of this plugin that Ansible does not already drop from module facts.
OWN_VARIABLES = "ansible_qubes_"


@functools.cache
def _channel_code() -> str:
    """A digest of the channel's code on both ends: the agent, the transport, the client and
    the multiplexer."""
    digest = hashlib.sha256()
    for module in (qubes_agent, qubes_transport, qubes_client, qubes_multiplexer):
        with open(module.__file__ or "", "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()


def describe_failure(
    qube: str, returncode: int | None, stderr: str, autostart: bool, state: str | None
) -> str:
    """Why a stream to `qube` gave no agent. The verdict rests on dom0's view of the qube (`state`
    from qube_state: "missing", "halted", "running", or None where it cannot be known) and on the
    transport's exit code; stderr, which the qube can write, is only quoted, bounded and printable.
    """
    if state == "missing":
        return f"qube {qube!r} does not exist"
    if state == "halted" and not autostart:
        return f"qube {qube!r} is not running and autostart is off"
    if returncode == 126:
        return f"qrexec policy refused the shell service to qube {qube!r}"
    if returncode == 127:
        return f"qube {qube!r} could not run python3 (it is needed to run tasks)"
    detail = f" (exit {returncode})" if returncode is not None else ""
    if state is None:
        detail += ": it may not exist, be halted with autostart off or be refused by policy"
    excerpt = qubes_client.printable(stderr, SHOWN).strip()
    return f"could not reach qube {qube!r}{detail}" + (f"; it said: {excerpt}" if excerpt else "")


def qube_state(qube: str, timeout: float) -> str | None:
    """dom0's view of the qube with qvm-check, whose exit code is 0 when the qube exists (with
    --running: when it runs) and non-zero otherwise: "missing", "halted" or "running"; None where
    qvm-check is not there (an admin qube) or does not answer."""
    if shutil.which("qvm-check") is None:
        return None

    def check(*arguments: str) -> int | None:
        try:
            return subprocess.run(
                ["qvm-check", "--quiet", *arguments, "--", qube],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            ).returncode
        except (OSError, subprocess.TimeoutExpired):
            return None

    exists = check()
    if exists is None:
        return None
    if exists != 0:
        return "missing"
    running = check("--running")
    if running is None:
        return None
    return "running" if running == 0 else "halted"


def planted_variables(names: list[str], variables: Mapping[str, Any]) -> list[str]:
    """The plugin's own variables that a host's facts carry. Facts outrank inventory variables
    and Ansible keeps these in them (it drops ansible_host, ansible_user and the like)."""
    facts = variables.get("ansible_facts") or {}
    return sorted(
        name
        for name in names
        if name.startswith(OWN_VARIABLES) and name[len("ansible_") :] in facts
    )


class Connection(ConnectionBase):
    """Tasks in qubes over qrexec."""

    transport = "qubes_infra.build.qubes"
    has_pipelining = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        # One stream per user asked for: the connection's own, and the become user's.
        self._links: dict[str | None, _Link] = {}

    def _resolve_option_variables(self, variables: Mapping[str, Any], templar: Any) -> Any:
        """Refuse to connect when facts would choose the connection (see the notes). From
        ansible-core 2.17 on, the plugin's variables are resolved here from all of the task's
        variables, facts included: the one place where the plugin can tell that a value may have
        come from the qube."""
        self._refuse_planted(variables)
        return super()._resolve_option_variables(variables, templar)

    def update_vars(self, variables: dict[str, Any]) -> None:
        """ansible-core 2.16 has no _resolve_option_variables: it hands the task's variables
        here, once the options are set and before anything runs, so the check is made here too."""
        self._refuse_planted(variables)
        super().update_vars(variables)

    def _refuse_planted(self, variables: Mapping[str, Any]) -> None:
        names = C.config.get_plugin_vars("connection", self._load_name)
        planted = planted_variables(names, variables)
        if planted:
            host = variables.get("inventory_hostname", "?")
            raise AnsibleConnectionFailure(
                f"host {host!r}: its facts set {', '.join(planted)}, which only the inventory may"
                " set; facts come from the qube, so its tasks are refused until its facts are"
                " cleared (meta task clear_facts)"
            )

    # -- connecting -------------------------------------------------------------------------------
    def _qube(self) -> str:
        return str(self.get_option("remote_addr"))

    def _transport(self) -> str:
        transport = str(self.get_option("transport"))
        if transport == "auto":
            return "qrexec-client-vm" if shutil.which("qrexec-client-vm") else "qvm-run"
        return transport

    def _stream_command(self, user: str | None) -> list[str]:
        qube = self._qube()
        service = "qubes.VMRootShell" if user == "root" else "qubes.VMShell"
        if self._transport() == "qrexec-client-vm":
            if user not in (None, "root"):
                raise AnsibleConnectionFailure(
                    f"from an admin qube only the default user or root can be used, not {user!r}"
                )
            return ["qrexec-client-vm", qube, service]
        command = ["qvm-run", "--pass-io", "--no-gui", "--service"]
        if not self.get_option("autostart"):
            command.append("--no-autostart")
        # Root is asked for even for qubes.VMRootShell: only from 4.3 does the qube force it.
        if user is not None:
            command += ["--user", user]
        return [*command, qube, service]

    def _failure(self, failure: qubes_transport.ConnectFailure) -> AnsibleConnectionFailure:
        qube = self._qube()
        stderr = to_text(failure.stderr, errors="surrogate_or_replace")
        if failure.returncode is None and not stderr:
            return AnsibleConnectionFailure(f"qube {qube!r}: {failure}")
        # A silent exit 1 is all qvm-run --no-autostart says of a halted qube: ask dom0 instead.
        state = None
        if self._transport() == "qvm-run":
            state = qube_state(qube, self.get_option("connect_timeout"))
        reason = describe_failure(
            qube, failure.returncode, stderr, self.get_option("autostart"), state
        )
        return AnsibleConnectionFailure(reason)

    def _connect(self) -> Connection:
        if not self._connected:
            self._link(self.get_option("remote_user"))
            self._connected = True
        return self

    def _link(self, user: str | None) -> _Link:
        """The stream as `user`, opened on first use."""
        if user in self._links:
            return self._links[user]
        command = self._stream_command(user)
        display.vvv(f"QUBES: {' '.join(command)}", host=self._qube())
        if self.get_option("persist"):
            link = self._multiplexer_socket(command)
            self._links[user] = _Link(qubes_client.socket_session(link), socket=link)
        else:
            try:
                stream = qubes_transport.Transport(command, self.get_option("connect_timeout"))
            except qubes_transport.ConnectFailure as failure:
                raise self._failure(failure) from None
            self._links[user] = _Link(qubes_client.stream_session(stream), stream=stream)
        return self._links[user]

    def _user(self, sudoable: bool) -> str | None:
        """Who runs a command: the become user when the task becomes one with this collection's
        become plugin (the qube is asked for that user; no sudo), else the connection's user."""
        if sudoable and self.become is not None and self.become.name == become_qubes.NAME:
            return self.become.target_user()
        return self.get_option("remote_user")

    def _control_path(self, command: list[str]) -> str:
        # The channel's code is part of the name: after the collection is upgraded, its client
        # starts a multiplexer and agent of its own version, never one left by the old version.
        digest = hashlib.sha256(json.dumps([command, _channel_code()]).encode()).hexdigest()[:20]
        return os.path.join(os.path.expanduser(CONTROL_DIRECTORY), f"qubes-{digest}")

    def _multiplexer_socket(self, command: list[str]) -> socket.socket:
        """A socket to the multiplexer for this stream, started first if none is running."""
        path = self._control_path(command)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        connected = _try_connect(path)
        if connected is not None:
            return connected
        with self._start_lock(path):
            connected = _try_connect(path)
            if connected is None:
                self._start_multiplexer(command, path)
                connected = _try_connect(path)
        if connected is None:
            raise AnsibleConnectionFailure(f"qube {self._qube()!r}: the multiplexer did not start")
        return connected

    @contextlib.contextmanager
    def _start_lock(self, path: str) -> Iterator[None]:
        """One start at a time per stream (a lock of its own: a qube that is slow to answer holds
        back no other), waited for no longer than a start may take."""
        patience = self.get_option("connect_timeout") + START_SLACK
        deadline = time.monotonic() + patience
        with open(f"{path}.lock", "a") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AnsibleConnectionFailure(
                            f"qube {self._qube()!r}: another start of its stream did not end"
                            f" within {patience} seconds"
                        ) from None
                    time.sleep(0.05)
            yield

    def _start_multiplexer(self, command: list[str], path: str) -> None:
        timeout = self.get_option("connect_timeout")
        spec = {
            "command": command,
            "socket": path,
            "idle": self.get_option("persist_idle"),
            "timeout": timeout,
        }
        read_end, write_end = os.pipe()
        process = subprocess.Popen(
            qubes_multiplexer.command(spec, write_end),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_end,),
            start_new_session=True,
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as notify:
            if not select.select([notify], [], [], timeout + START_SLACK)[0]:
                process.kill()
                raise AnsibleConnectionFailure(
                    f"qube {self._qube()!r}: no answer within {timeout} seconds"
                )
            line = notify.readline(1 << 17)
        try:
            report = json.loads(line)
        except ValueError:
            raise AnsibleConnectionFailure(
                f"qube {self._qube()!r}: the multiplexer failed"
            ) from None
        if not report.get("ok"):
            raise self._failure(
                qubes_transport.ConnectFailure(
                    report.get("message", ""),
                    report.get("returncode"),
                    to_bytes(report.get("stderr", "")),
                )
            )

    def _require_session(self, sudoable: bool = False) -> qubes_client.Session:
        self._connect()
        return self._link(self._user(sudoable)).session

    def _limit(self, option: str) -> int | None:
        """A MiB option as bytes (0: no limit)."""
        return self.get_option(option) * MIB or None

    def _abandon(self) -> None:
        """After a timeout or a limit, the stream may still be busy with what was stopped (a
        qube that stopped reading, a flood): the next operation gets a new one."""
        self.reset()

    def _broken(self, error: Exception) -> AnsibleConnectionFailure:
        self.close()
        return AnsibleConnectionFailure(f"qube {self._qube()!r}: {error}")

    # -- operations -------------------------------------------------------------------------------
    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        display.vvv(f"EXEC {cmd}", host=self._qube())
        timeout = self.get_option("command_timeout") or None
        limit = self._limit("output_limit")
        session = self._require_session(sudoable=sudoable)
        try:
            result = session.run(to_text(cmd), to_bytes(in_data or b""), timeout, limit)
        except TimeoutError:
            self._abandon()
            raise AnsibleError(
                f"command timed out after {timeout} seconds in qube {self._qube()!r} and was killed"
            ) from None
        except qubes_client.LimitExceeded:
            self._abandon()
            raise AnsibleError(
                f"command in qube {self._qube()!r} returned more than"
                f" {self.get_option('output_limit')} MiB of output (output_limit) and was killed"
            ) from None
        except (OSError, ChannelError) as error:
            raise self._broken(error) from None
        return result.rc, bytes(result.stdout), bytes(result.stderr)

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._qube())
        timeout = self.get_option("transfer_timeout") or None
        session = self._require_session()
        try:
            with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as source:
                result = session.put(source, to_text(out_path), timeout)
        except TimeoutError:
            self._abandon()
            raise AnsibleError(
                f"transfer of {in_path} to qube {self._qube()!r} took more than {timeout}"
                " seconds (transfer_timeout) and was stopped"
            ) from None
        except (OSError, ChannelError) as error:
            raise self._broken(error) from None
        if result.rc != 0:
            raise AnsibleError(
                f"failed to transfer {in_path} to {self._qube()}: {self._shown(result.error)}"
            )

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._qube())
        timeout = self.get_option("transfer_timeout") or None
        session = self._require_session()
        destination = to_bytes(out_path, errors="surrogate_or_strict")
        partial = destination + b".part"
        try:
            with open(partial, "wb") as sink:
                result = session.fetch(
                    to_text(in_path), sink.write, timeout, self._limit("fetch_limit")
                )
            if result.rc != 0:
                raise AnsibleError(
                    f"failed to fetch {in_path} from {self._qube()}: {self._shown(result.error)}"
                )
            os.rename(partial, destination)
        except BaseException as error:
            # Whatever ended it (the qube, a limit, an interrupted run), no partial file stays.
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise self._fetch_failure(in_path, error) from None

    def _fetch_failure(self, in_path: str, error: BaseException) -> BaseException:
        if isinstance(error, TimeoutError):
            self._abandon()
            return AnsibleError(
                f"fetch of {in_path} from qube {self._qube()!r} took more than"
                f" {self.get_option('transfer_timeout')} seconds (transfer_timeout) and was stopped"
            )
        if isinstance(error, qubes_client.LimitExceeded):
            self._abandon()
            return AnsibleError(
                f"{in_path} in qube {self._qube()!r} is larger than"
                f" {self.get_option('fetch_limit')} MiB (fetch_limit): the fetch was stopped"
            )
        if isinstance(error, (OSError, ChannelError)):
            return self._broken(error)
        return error

    @staticmethod
    def _shown(text: str | None) -> str:
        return qubes_client.printable(text or "unknown error", SHOWN)

    def reset(self) -> None:
        """Start afresh: the next task gets new streams (and new agents) in the qube."""
        if self.get_option("persist"):
            for user in {self.get_option("remote_user"), *self._links}:
                with contextlib.suppress(OSError):
                    os.unlink(self._control_path(self._stream_command(user)))
        self.close()

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
        self._connected = False


class _Link:
    """A session with what carries it: a multiplexer's socket or a stream of its own."""

    def __init__(
        self,
        session: qubes_client.Session,
        socket: socket.socket | None = None,
        stream: qubes_transport.Transport | None = None,
    ) -> None:
        self.session = session
        self._socket = socket
        self._stream = stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._socket is not None:
            qubes_client.shut_down(self._socket)
            self._socket.close()


def _try_connect(path: str) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        client.close()
        return None
    return client
