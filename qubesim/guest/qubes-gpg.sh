# Split GPG, for login shells (and qubes-gpg-client-wrapper, which sources this file): the keys
# qube named in /rw/config/gpg-split-domain wins over an inherited QUBES_GPG_DOMAIN; with neither,
# dom0's policy picks the keys qube (@default with a target= rule).
if [ -s /rw/config/gpg-split-domain ]; then
    QUBES_GPG_DOMAIN=$(cat /rw/config/gpg-split-domain)
    export QUBES_GPG_DOMAIN
elif [ -z "${QUBES_GPG_DOMAIN-}" ]; then
    export QUBES_GPG_DOMAIN=@default
fi
