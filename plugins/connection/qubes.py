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
  - A missing, halted (with O(autostart=false)) or refused qube, or a broken stream, is reported
    as unreachable; a command's own failure is the command's. A handshake tells them apart.
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
      - The user to run as in the qube. V(root) uses C(qubes.VMRootShell), without sudo.
      - Unset means the qube's default user. From an admin qube only the default user and
        V(root) are possible.
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
    description: Seconds to wait for the qube's agent, including starting the qube.
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
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display
from ansible_collections.qubes_infra.build.plugins.module_utils import qubes_channel

display = Display()

CONTROL_DIRECTORY = "~/.ansible/cp"
STDERR_SHOWN = 600


def describe_failure(qube: str, returncode: int | None, stderr: str, autostart: bool) -> str:
    """Why a stream to `qube` gave no agent, from the transport's exit code and stderr (which come
    from dom0's tools and the qube: shown bounded and without control characters)."""
    text = re.sub(r"[^\x20-\x7e\n]", "?", stderr)[-STDERR_SHOWN:].strip()
    if "no such domain" in text:
        return f"qube {qube!r} does not exist"
    if not autostart and "not running" in text:
        return f"qube {qube!r} is not running and autostart is off"
    if returncode == 126 or "Request refused" in text:
        return f"qrexec policy refused the shell service to qube {qube!r}"
    if returncode == 127 and "python3" in text:
        return f"qube {qube!r} has no python3 (it is needed to run tasks)"
    detail = f" (exit {returncode})" if returncode is not None else ""
    return f"could not reach qube {qube!r}{detail}" + (f": {text}" if text else "")


class Connection(ConnectionBase):
    """Tasks in qubes over qrexec."""

    transport = "qubes_infra.build.qubes"
    has_pipelining = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._session: qubes_channel.Session | None = None
        self._stream: qubes_channel.Transport | None = None
        self._socket: socket.socket | None = None

    # -- connecting -------------------------------------------------------------------------------
    def _qube(self) -> str:
        return str(self.get_option("remote_addr"))

    def _stream_command(self) -> list[str]:
        qube, user = self._qube(), self.get_option("remote_user")
        service = "qubes.VMRootShell" if user == "root" else "qubes.VMShell"
        transport = self.get_option("transport")
        if transport == "auto":
            transport = "qrexec-client-vm" if shutil.which("qrexec-client-vm") else "qvm-run"
        if transport == "qrexec-client-vm":
            if user not in (None, "root"):
                raise AnsibleConnectionFailure(
                    f"from an admin qube only the default user or root can be used, not {user!r}"
                )
            return ["qrexec-client-vm", qube, service]
        command = ["qvm-run", "--pass-io", "--no-gui", "--service"]
        if not self.get_option("autostart"):
            command.append("--no-autostart")
        if user not in (None, "root"):
            command += ["--user", user]
        return [*command, qube, service]

    def _failure(self, failure: qubes_channel.ConnectFailure) -> AnsibleConnectionFailure:
        stderr = to_text(failure.stderr, errors="surrogate_or_replace")
        if failure.returncode is None and not stderr:
            reason = f"qube {self._qube()!r}: {failure}"
        else:
            reason = describe_failure(
                self._qube(), failure.returncode, stderr, self.get_option("autostart")
            )
        return AnsibleConnectionFailure(reason)

    def _connect(self) -> Connection:
        if self._connected:
            return self
        command = self._stream_command()
        display.vvv(f"QUBES: {' '.join(command)}", host=self._qube())
        if self.get_option("persist"):
            self._socket = self._multiplexer_socket(command)
            reader = qubes_channel.Reader(self._socket.fileno())
            self._session = qubes_channel.Session(self._socket.sendall, reader)
        else:
            try:
                self._stream = qubes_channel.Transport(command, self.get_option("connect_timeout"))
            except qubes_channel.ConnectFailure as failure:
                raise self._failure(failure) from None
            self._session = qubes_channel.Session(self._stream.send_bytes, self._stream.reader)
        self._connected = True
        return self

    def _control_path(self, command: list[str]) -> str:
        digest = hashlib.sha256(json.dumps(command).encode()).hexdigest()[:20]
        return os.path.join(os.path.expanduser(CONTROL_DIRECTORY), f"qubes-{digest}")

    def _multiplexer_socket(self, command: list[str]) -> socket.socket:
        """A socket to the multiplexer for this stream, started first if none is running."""
        path = self._control_path(command)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        connected = _try_connect(path)
        if connected is not None:
            return connected
        # One lock for the directory: starts are rare and short, and no lock files pile up.
        with open(os.path.join(os.path.dirname(path), "qubes.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            connected = _try_connect(path)
            if connected is None:
                self._start_multiplexer(command, path)
                connected = _try_connect(path)
        if connected is None:
            raise AnsibleConnectionFailure(f"qube {self._qube()!r}: the multiplexer did not start")
        return connected

    def _start_multiplexer(self, command: list[str], path: str) -> None:
        spec = {
            "command": command,
            "socket": path,
            "idle": self.get_option("persist_idle"),
            "timeout": self.get_option("connect_timeout"),
        }
        read_end, write_end = os.pipe()
        subprocess.Popen(
            [sys.executable, qubes_channel.__file__, "mux", json.dumps(spec), str(write_end)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_end,),
            start_new_session=True,
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as notify:
            line = notify.readline(1 << 17)
        try:
            report = json.loads(line)
        except ValueError:
            raise AnsibleConnectionFailure(
                f"qube {self._qube()!r}: the multiplexer failed"
            ) from None
        if not report.get("ok"):
            raise self._failure(
                qubes_channel.ConnectFailure(
                    report.get("message", ""),
                    report.get("returncode"),
                    to_bytes(report.get("stderr", "")),
                )
            )

    def _require_session(self) -> qubes_channel.Session:
        self._connect()
        if self._session is None:
            raise AnsibleConnectionFailure(f"qube {self._qube()!r}: not connected")
        return self._session

    # -- operations -------------------------------------------------------------------------------
    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        display.vvv(f"EXEC {cmd}", host=self._qube())
        timeout = self.get_option("command_timeout") or None
        session = self._require_session()
        try:
            result = session.run(to_text(cmd), to_bytes(in_data or b""), timeout)
        except TimeoutError:
            raise AnsibleError(
                f"command timed out after {timeout} seconds in qube {self._qube()!r} and was killed"
            ) from None
        except (OSError, qubes_channel.ChannelError) as error:
            raise AnsibleConnectionFailure(f"qube {self._qube()!r}: {error}") from None
        return result.rc, bytes(result.stdout), bytes(result.stderr)

    def put_file(self, in_path: str, out_path: str) -> None:
        super().put_file(in_path, out_path)
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._qube())
        session = self._require_session()
        try:
            with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as source:
                result = session.put(source, to_text(out_path))
        except (OSError, qubes_channel.ChannelError) as error:
            raise AnsibleConnectionFailure(f"qube {self._qube()!r}: {error}") from None
        if result.rc != 0:
            raise AnsibleError(f"failed to transfer {in_path} to {self._qube()}: {result.error}")

    def fetch_file(self, in_path: str, out_path: str) -> None:
        super().fetch_file(in_path, out_path)
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._qube())
        session = self._require_session()
        destination = to_bytes(out_path, errors="surrogate_or_strict")
        partial = destination + b".part"
        try:
            with open(partial, "wb") as sink:
                result = session.fetch(to_text(in_path), sink.write)
        except (OSError, qubes_channel.ChannelError) as error:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise AnsibleConnectionFailure(f"qube {self._qube()!r}: {error}") from None
        if result.rc != 0:
            os.unlink(partial)
            raise AnsibleError(f"failed to fetch {in_path} from {self._qube()}: {result.error}")
        os.rename(partial, destination)

    def reset(self) -> None:
        """Start afresh: the next task gets a new stream (and a new agent) in the qube."""
        if self.get_option("persist"):
            with contextlib.suppress(OSError):
                os.unlink(self._control_path(self._stream_command()))
        self.close()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._session = None
        self._connected = False


def _try_connect(path: str) -> socket.socket | None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
    except OSError:
        client.close()
        return None
    return client
