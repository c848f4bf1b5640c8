#!/bin/sh
# What qubes-misc-post.service runs (qubes-core-agent-linux, vm-systemd/misc-post.sh): the
# updates proxy settings, then the qube's own boot scripts, rc.local.d first.
/usr/lib/qubes/update-proxy-configs
for rc in /rw/config/rc.local.d/*.rc /rw/config/rc.local; do
    [ -f "$rc" ] && [ -x "$rc" ] || continue
    "$rc"
done
exit 0
