# mmdebstrap --customize-hook for xwhep's Debian VM image; $1 is the image's root directory.
# cloud-init + openssh-server; the job user is made per job by cloud-init from the seed's user-data (xwjob, no sudo:
# sudo is not even installed, no password, ssh with a key only); root is locked.
set -eu
R=$1
echo 'LABEL=xwroot / ext4 defaults,noatime,errors=remount-ro 0 1' >"$R/etc/fstab"
echo xwjob >"$R/etc/hostname"
cat >"$R/etc/cloud/cloud.cfg.d/90_xwhep.cfg" <<'EOF'
# xwhep: the seed is a NoCloud ISO; nothing else is probed (no metadata service can answer: the guest has no way out)
datasource_list: [ NoCloud, None ]
EOF
mkdir -p "$R/etc/ssh/sshd_config.d"
cat >"$R/etc/ssh/sshd_config.d/90-xwhep.conf" <<'EOF'
# xwhep: keys only, never root
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
EOF
# host keys are made per instance by cloud-init (ssh_genkeytypes in the user-data): none baked into the image
rm -f "$R"/etc/ssh/ssh_host_*
chroot "$R" passwd -l root >/dev/null
# periodic maintenance has no place in a VM that lives for one job
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
    getty@tty1.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
# the guest agent: started by a unit once cloud-init's init stage is done; the config and final stages are masked
here=$(dirname "$0")
install -m 0644 "$here/xwhep-agent.service" "$R/etc/systemd/system/xwhep-agent.service"
install -m 0755 "$here/xwhep-agent-launch" "$R/usr/local/sbin/xwhep-agent-launch"
ln -sf /etc/systemd/system/xwhep-agent.service "$R/etc/systemd/system/multi-user.target.wants/xwhep-agent.service"
for unit in cloud-config.service cloud-final.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$unit"
done
