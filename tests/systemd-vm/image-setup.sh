#!/bin/bash
# Runs once inside the freshly debootstrapped tree (chroot, as root, no
# network, nothing mounted) to turn it into the systemd VM test image.
# Part of the image recipe: editing this file rebuilds the cached image
# (xtask/src/systemd_vm.rs hashes it with the package list).
set -euo pipefail

# No first-boot prompts, a stable identity across runs.
echo corral-vm > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 corral-vm\n' > /etc/hosts
echo 3c0a7e1e5d6f4b0c9a8b7c6d5e4f3a2b > /etc/machine-id
# Root without a password: only reachable on the VM's serial console.
passwd -d root >/dev/null

# The desktop user. Linger starts user@1000.service at boot, as a login would.
useradd --create-home --uid 1000 --user-group --shell /bin/bash alice
mkdir -p /var/lib/systemd/linger
touch /var/lib/systemd/linger/alice

# Quiet runs: nothing periodic starts while the scenarios measure.
for unit in apt-daily.timer apt-daily-upgrade.timer man-db.timer \
            e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done
mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nRateLimitBurst=0\n' > /etc/systemd/journald.conf.d/volatile.conf

# The host's share: the package, the scripts, and where results go.
mkdir -p /host
echo 'host /host 9p trans=virtio,version=9p2000.L,msize=524288,cache=none,nofail 0 0' >> /etc/fstab
printf '9p\n9pnet_virtio\n' > /etc/modules-load.d/9p.conf

# The boot unit: run the share's script once the system is up, then power
# off whatever happens. Type=exec lets boot finish (the script waits for
# `systemctl is-system-running --wait` itself); RuntimeMaxSec is the hard
# stop, below the host's own 15-minute limit.
cat > /etc/systemd/system/corral-vm-tests.service <<'UNIT'
[Unit]
Description=corral systemd VM tests (/host/run-tests.sh)
# Wants, not Requires: if the share does not mount, the script fails to
# start, the unit fails and FailureAction still powers off.
Wants=host.mount
After=host.mount
SuccessAction=poweroff
FailureAction=poweroff

[Service]
Type=exec
ExecStart=/bin/bash /host/run-tests.sh
StandardOutput=journal+console
StandardError=journal+console
RuntimeMaxSec=780

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf ../corral-vm-tests.service /etc/systemd/system/multi-user.target.wants/corral-vm-tests.service

# Smaller image: no package lists or downloaded .debs.
apt-get clean
rm -rf /var/lib/apt/lists/*
