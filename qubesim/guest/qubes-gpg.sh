# Split GPG: the keys qube named in /rw/config/gpg-split-domain serves this qube's gpg requests.
if [ -s /rw/config/gpg-split-domain ]; then
    QUBES_GPG_DOMAIN=$(cat /rw/config/gpg-split-domain)
    export QUBES_GPG_DOMAIN
fi
