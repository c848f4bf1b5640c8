"""qvm-run: run a command (through qubes.VMShell) or a qrexec service in a qube.

As qubes-core-admin-client's qubesadmin/tools/qvm_run.py: a command with ARGs is every word
quoted and joined; --filter-escape-chars is on when stdout is a terminal (and then, with
--pass-io, the output is coloured unless --no-colour-output); --service without --pass-io starts
the service and returns at once; --no-autostart on a halted qube is exit code 1, said only at the
default verbosity without --pass-io; messages go to stderr at upstream's verbosity.
The service gets our stdout and stderr, so output flows straight from the qube (through a filter
when escape characters are filtered), and its exit code becomes ours. For a command, the command
line goes first on the service's stdin, followed by ours, copied by a small feeder with splice:
constant memory, any bytes.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable

from qubesim.errors import QubesimError, UsageError
from qubesim.model import ADMIN_VM, State
from qubesim.qrexec import InvalidRequest, Qrexec
from qubesim.release import since
from qubesim.tools.common import Context, parser, run

CHUNK = 1 << 16


def shell_input(command: str) -> bytes:
    """What goes before the caller's data on qubes.VMShell's stdin, exactly as Qubes' qvm-run sends
    it: the command line ending in `; exit`, so that the shell ends with the command and never
    executes data the command left unread."""
    return command.rstrip("\n").encode() + b"; exit\n"


def _copy_until_reader_leaves(source: int, pipe: int) -> None:
    """Copy source to pipe; stop at end of input or as soon as nobody reads the pipe any more
    (so that a terminal's input is not swallowed after the command has ended)."""
    poller = select.poll()
    poller.register(source, select.POLLIN)
    poller.register(pipe, 0)  # POLLERR/POLLHUP are always reported: the reader has gone
    while True:
        for fd, events in poller.poll():
            if fd == pipe:
                return
            if events & (select.POLLIN | select.POLLHUP):
                try:
                    moved = os.splice(source, pipe, CHUNK)
                except OSError as error:
                    if error.errno != errno.EINVAL:
                        raise
                    data = os.read(source, CHUNK)
                    moved = len(data)
                    if data:
                        os.write(pipe, data)
                if moved == 0:
                    return
            elif events & (select.POLLERR | select.POLLNVAL):
                return


def _feed(pipe: int, prefix: bytes, pass_stdin: bool) -> None:
    try:
        os.write(pipe, prefix)
        if pass_stdin:
            _copy_until_reader_leaves(0, pipe)
    except BrokenPipeError:
        pass
    finally:
        os._exit(0)


# What a terminal may safely show: bytes other than printable ASCII, tab, newline, carriage
# return, backspace and bell become '_' (qubes-core-qrexec, libqrexec/replace.c, do_replace_chars).
_SAFE_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D, 0x08, 0x07}
_ESCAPE_FILTER = bytes(byte if byte in _SAFE_BYTES else ord("_") for byte in range(256))


def _filtered_copy(source: int, destination: int) -> None:
    with os.fdopen(source, "rb", buffering=0) as reader:
        while data := reader.read(CHUNK):
            view = memoryview(data.translate(_ESCAPE_FILTER))
            while view:
                view = view[os.write(destination, view) :]


class _Output:
    """Where the service writes one of its outputs: our own descriptor, or a pipe whose content
    a thread filters into it."""

    def __init__(self, fd: int, filtered: bool) -> None:
        self.fd = fd
        self.thread: threading.Thread | None = None
        if filtered:
            read_end, self.fd = os.pipe()
            self.thread = threading.Thread(target=_filtered_copy, args=(read_end, fd), daemon=True)
            self.thread.start()

    def handed_over(self) -> None:
        if self.thread is not None:
            os.close(self.fd)

    def drained(self) -> None:
        if self.thread is not None:
            self.thread.join()


def _run(argv: list[str], *, prefix: bytes | None, filters: tuple[bool, bool] | None) -> int:
    """Run the service with our stdio, or none when `filters` is None (no --pass-io); `filters`
    says whether to filter escape characters out of stdout and stderr. Returns its exit code."""
    stdin: int = 0 if filters is not None else subprocess.DEVNULL
    if prefix is not None:
        read_end, write_end = os.pipe()
        if os.fork() == 0:
            os.close(read_end)
            _feed(write_end, prefix, filters is not None)
        os.close(write_end)
        stdin = read_end
    if filters is None:
        outputs: list[_Output] = []
        fds: list[int] = [subprocess.DEVNULL, subprocess.DEVNULL]
    else:
        outputs = [_Output(1, filters[0]), _Output(2, filters[1])]
        fds = [output.fd for output in outputs]
    process = subprocess.Popen(argv, stdin=stdin, stdout=fds[0], stderr=fds[1])
    for output in outputs:
        output.handed_over()
    code = process.wait()
    for output in outputs:
        output.drained()
    return 128 - code if code < 0 else code


def _run_detached(argv: list[str], done: Callable[[int], None]) -> None:
    """Start the service without our stdio and return at once (qrexec-client -e); a child of
    ours waits for it and reports its exit code to `done`."""
    if os.fork() != 0:
        return
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        code = subprocess.run(argv, stdin=null, stdout=null, stderr=null).returncode
        done(128 - code if code < 0 else code)
    finally:
        os._exit(0)


def _command_line(arguments: argparse.Namespace) -> str:
    """What qubes.VMShell runs: COMMAND as it is, or with ARGs (or --no-shell) every word quoted
    and joined with spaces (qvm_run.py, run_command_single, for qubes without qubes.VMExec)."""
    if arguments.cmd_args or arguments.no_shell:
        return " ".join(shlex.quote(word) for word in [arguments.cmd, *arguments.cmd_args])
    return arguments.cmd


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _say(message: str, colour: str | None) -> None:
    """A message of qvm-run's own on stderr, out of the qube's colour (print_no_color)."""
    text = f"\033[0m{message}\033[0;{colour}m" if colour else message
    print(text, file=sys.stderr, flush=True)


def _colours(arguments: argparse.Namespace) -> tuple[str | None, str | None]:
    """(stdout colour, stderr colour): with --pass-io, red by default where filtering or a
    terminal makes it safe, as upstream's main()."""
    output, error = arguments.color_output or None, arguments.color_stderr or None
    if arguments.pass_io:
        if arguments.color_output is None and arguments.filter_esc:
            output = "31"
        if arguments.color_stderr is None and _isatty(2):
            error = "31"
    if output and not arguments.filter_esc:
        raise UsageError("--color-output must be used with --filter-escape-chars")
    return output, error


def _feature_with_template(state: State, name: str, feature: str) -> str | None:
    """A feature of the qube, or else of its template (qubes/features.py check_with_template)."""
    qube: str | None = name
    while qube is not None:
        features = state.qube(qube)["features"]
        if feature in features:
            return str(features[feature])
        has_template = state.has_property(qube, "template")
        qube = state.get_property(qube, "template") if has_template else None
    return None


def _root_shell(state: State, name: str, arguments: argparse.Namespace) -> bool:
    """From 4.3 a command for root goes to qubes.VMRootShell (whose rpc-config forces root) when
    the qube's template says it has qubes.VMRootExec, which came with that rpc-config (qvm_run.py,
    run_command_single); else, and on 4.2, to qubes.VMShell as root."""
    return (
        arguments.user == "root"
        and not (arguments.cmd_args or arguments.no_shell)
        and since(state.release, "4.3")
        and bool(_feature_with_template(state, name, "supported-rpc.qubes.VMRootExec"))
    )


def _body(context: Context, arguments: argparse.Namespace) -> int:
    name = arguments.VMNAME
    state = context.state()
    state.qube(name)
    if name == ADMIN_VM:
        raise QubesimError("running commands in dom0 with qvm-run is not supported by qubesim")
    if arguments.service and arguments.no_shell:
        raise UsageError("--no-shell does not apply to --service")
    if arguments.service and arguments.cmd_args:
        raise UsageError("--service takes one SERVICE[+ARGUMENT] and no further arguments")
    colour, error_colour = _colours(arguments)
    verbosity = 1 + arguments.verbose - arguments.quiet - (1 if arguments.pass_io else 0)
    if not arguments.autostart and not context.runtime.is_running(name):
        if verbosity > 0:
            _say(f"Qube '{name}' not started", error_colour)
        return 1
    user = arguments.user
    if arguments.service:
        service, prefix = arguments.cmd, None
    else:
        service, prefix = "qubes.VMShell", shell_input(_command_line(arguments))
        if _root_shell(state, name, arguments):
            service, user = "qubes.VMRootShell", None
    qrexec = Qrexec(context.layout)
    try:
        argv = qrexec.call_from_dom0(name, user, service)
    except InvalidRequest as error:
        raise UsageError(str(error)) from None
    if verbosity > 0:
        _say(f"Running '{arguments.cmd}' on {name}", error_colour)

    def audit(code: int) -> None:
        qrexec.audit_dom0_call(name, service, code)

    if arguments.service and not arguments.pass_io:
        _run_detached(argv, audit)
        return 0
    filters = (arguments.filter_esc, arguments.filter_esc or _isatty(2))
    code = _coloured(
        lambda: _run(argv, prefix=prefix, filters=filters if arguments.pass_io else None),
        colour,
        error_colour,
    )
    audit(code)
    if code and verbosity > 0:
        _say(f"{name}: command failed with code: {code}", error_colour)
    return code


def _coloured(body: Callable[[], int], colour: str | None, error_colour: str | None) -> int:
    """Run `body` with the qube's output (and stderr) in their colours, reset afterwards."""
    streams = [(sys.stdout, colour), (sys.stderr, error_colour)]
    for stream, code in streams:
        if code:
            stream.write(f"\033[0;{code}m")
            stream.flush()
    try:
        return body()
    finally:
        for stream, code in streams:
            if code:
                stream.write("\033[0m")
                stream.flush()


def main(argv: list[str]) -> int:
    tool = parser("qvm-run", "Run a command in a qube, or a qrexec service with --service.")
    tool.add_argument("--user", "-u", help="run as this user (default: the qube's default_user)")
    tool.add_argument(
        "--autostart", "--auto", "-a", action="store_true", default=True, help=argparse.SUPPRESS
    )
    tool.add_argument(
        "--no-autostart",
        "--no-auto",
        "-n",
        dest="autostart",
        action="store_false",
        help="do not start the qube if it is halted (exit code 1 instead)",
    )
    tool.add_argument(
        "--pass-io",
        "-p",
        action="store_true",
        help="pass stdin, stdout and stderr and return the command's exit code",
    )
    tool.add_argument(
        "--gui", dest="gui", action="store_true", default=None, help=argparse.SUPPRESS
    )
    tool.add_argument(
        "--no-gui",
        "--nogui",
        dest="gui",
        action="store_false",
        help="do not use the GUI (qubesim has none)",
    )
    for kind, stream in (("output", "the qube's stdout"), ("stderr", "the qube's stderr")):
        tool.add_argument(
            f"--colour-{kind}",
            f"--color-{kind}",
            metavar="COLOUR",
            dest=f"color_{kind}",
            default=None,
            help=f"mark {stream} with this ANSI colour (e.g. 31 for red)",
        )
        tool.add_argument(
            f"--no-colour-{kind}",
            f"--no-color-{kind}",
            dest=f"color_{kind}",
            action="store_false",
            help=f"do not colour {stream}",
        )
    tool.add_argument(
        "--filter-escape-chars",
        dest="filter_esc",
        action="store_true",
        default=_isatty(1),
        help="filter terminal escape sequences (default when stdout is a terminal)",
    )
    tool.add_argument(
        "--no-filter-escape-chars",
        dest="filter_esc",
        action="store_false",
        help="do not filter terminal escape sequences",
    )
    tool.add_argument(
        "--service",
        action="store_true",
        help="COMMAND is a qrexec service name, called with the caller's stdio",
    )
    tool.add_argument(
        "--no-shell",
        action="store_true",
        help="treat COMMAND as a simple executable, not a shell command",
    )
    tool.add_argument("VMNAME")
    tool.add_argument("cmd", metavar="COMMAND")
    tool.add_argument("cmd_args", nargs=argparse.REMAINDER, metavar="ARG")
    return run(tool, argv, _body)
