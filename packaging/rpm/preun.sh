# shellcheck shell=sh
# twinsan rpm %preun ($1: 0 = last removal, 1 = upgrade). On removal stop and disable the
# service, like %systemd_preun (systemd 219 has no `disable --now`).
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable twinsan.service >/dev/null 2>&1 || :
    systemctl stop twinsan.service >/dev/null 2>&1 || :
fi
