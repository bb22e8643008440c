# shellcheck shell=sh
# twinsan rpm %postun ($1: 0 = removed, 1 = upgraded): forget the removed or replaced unit;
# after a removal drop the package's directories if they are empty. /var/lib/twinsan is
# kept whenever it holds anything (identities, LUN files): data is never deleted.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 0 ]; then
    rmdir /usr/share/doc/twinsan /etc/twinsan /var/lib/twinsan 2>/dev/null || :
fi
