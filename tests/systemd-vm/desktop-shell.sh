#!/bin/bash
# The stand-in desktop shell (run by lib.sh's desktop_shell_start as alice's
# user service in session.slice, the way gnome-shell or plasmashell runs).
# It reads `UNIT WORD...` lines from the FIFO $1 and starts each command in
# its own scope, app.slice/UNIT, as a desktop launches an app; the app's pid
# goes to $2/UNIT (systemd-run --scope execs the command, keeping its pid).
exec 3<>"$1"
while read -r unit line <&3; do
    read -r -a words <<< "$line"
    systemd-run --user --scope --quiet --slice=app.slice --unit="$unit" -- "${words[@]}" &
    echo "$!" > "$2/$unit"
done
