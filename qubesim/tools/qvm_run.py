"""qvm-run: run a command (through qubes.VMShell) or a qrexec service in a qube.

The service gets our stdout and stderr, so output flows straight from the qube, and its exit code
becomes ours. For a command, the command line goes first on the
service's stdin, followed by ours, copied by a small feeder with splice: constant memory, any bytes.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import shlex
import subprocess

from qubesim.errors import QubesimError, UsageError
from qubesim.model import ADMIN_VM
from qubesim.qrexec import InvalidRequest, Qrexec
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


def _run(argv: list[str], *, prefix: bytes | None, pass_io: bool) -> int:
    """Run the service with our stdio (or none without --pass-io); return its exit code."""
    stdin: int = 0 if pass_io else subprocess.DEVNULL
    if prefix is not None:
        read_end, write_end = os.pipe()
        if os.fork() == 0:
            os.close(read_end)
            _feed(write_end, prefix, pass_io)
        os.close(write_end)
        stdin = read_end
    output = None if pass_io else subprocess.DEVNULL
    code = subprocess.run(argv, stdin=stdin, stdout=output, stderr=output).returncode
    return 128 - code if code < 0 else code


def _body(context: Context, arguments: argparse.Namespace) -> int:
    name = arguments.VMNAME
    state = context.state()
    state.qube(name)
    if name == ADMIN_VM:
        raise QubesimError("running commands in dom0 with qvm-run is not supported by qubesim")
    if arguments.no_shell:
        raise UsageError("--no-shell is not supported by qubesim")
    if not arguments.autostart and not context.runtime.is_running(name):
        raise QubesimError(f"domain {name} is not running")
    if arguments.service:
        if arguments.cmd_args:
            raise UsageError("--service takes one SERVICE[+ARGUMENT] and no further arguments")
        service, prefix = arguments.cmd, None
    else:
        command = " ".join([arguments.cmd, *map(shlex.quote, arguments.cmd_args)])
        service, prefix = "qubes.VMShell", shell_input(command)
    qrexec = Qrexec(context.layout)
    try:
        argv = qrexec.call_from_dom0(name, arguments.user, service)
    except InvalidRequest as error:
        raise UsageError(str(error)) from None
    code = _run(argv, prefix=prefix, pass_io=arguments.pass_io)
    qrexec.audit_dom0_call(name, service, code)
    return code


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
        help="do not start the qube if it is halted (fail instead)",
    )
    tool.add_argument(
        "--pass-io",
        "-p",
        action="store_true",
        help="pass stdin, stdout and stderr and return the command's exit code",
    )
    tool.add_argument(
        "--gui", dest="gui", action="store_true", default=True, help=argparse.SUPPRESS
    )
    tool.add_argument(
        "--no-gui",
        "--nogui",
        dest="gui",
        action="store_false",
        help="do not use the GUI (qubesim has none)",
    )
    tool.add_argument(
        "--service",
        action="store_true",
        help="COMMAND is a qrexec service name, called with the caller's stdio",
    )
    tool.add_argument("--no-shell", action="store_true", help=argparse.SUPPRESS)
    for flag in (
        "--filter-escape-chars",
        "--no-filter-escape-chars",
        "--no-color-output",
        "--no-colour-output",
    ):
        tool.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    tool.add_argument("VMNAME")
    tool.add_argument("cmd", metavar="COMMAND")
    tool.add_argument("cmd_args", nargs=argparse.REMAINDER, metavar="ARG")
    return run(tool, argv, _body)
