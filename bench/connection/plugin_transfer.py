"""One put and one fetch of a file through the qubes connection plugin alone, for run.py: no copy
or fetch module around it, so none of their checksums, temporary files and module runs; only what
the plugin itself moves. Prints the seconds of each as JSON.

Usage (inside `qubesim dom0`, with ANSIBLE_COLLECTIONS_PATH set): plugin_transfer.py QUBE SOURCE
REMOTE_PATH FETCHED_TO
"""

from __future__ import annotations

import json
import sys
import time

from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import connection_loader, init_plugin_loader


def main(qube: str, source: str, remote: str, fetched: str) -> None:
    init_plugin_loader()
    connection = connection_loader.get("qubes_infra.build.qubes", PlayContext(), None)
    connection.set_options(
        var_options={"inventory_hostname": qube, "ansible_qubes_persist_idle": 30}
    )
    connection._connect()
    connection.exec_command("true")  # the stream is up before the clock starts
    begin = time.monotonic()
    connection.put_file(source, remote)
    put = time.monotonic() - begin
    begin = time.monotonic()
    connection.fetch_file(remote, fetched)
    fetch = time.monotonic() - begin
    connection.exec_command(f"rm -f {remote}")
    connection.close()
    print(json.dumps({"put": put, "fetch": fetch}))


if __name__ == "__main__":
    main(*sys.argv[1:])
