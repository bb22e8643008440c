# shellcheck shell=sh
# twinsan rpm %post ($1: 1 = install, 2 = upgrade): the data directory, daemon-reload. Never
# starts or restarts the daemon: after an upgrade run `systemctl restart twinsan` yourself (on
# an HA pair one host at a time: see "Upgrade" in /usr/share/doc/twinsan/README.md).
if [ ! -d /var/lib/twinsan ]; then
    install -d -m 0700 /var/lib/twinsan
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
