# xwhep guest agent, protocol 1 (see xwhep/vm/__init__.py). POSIX sh: runs under busybox ash (the minimal image's
# /init) and dash (cloud-init's runcmd in distro images), as root, with the seed mounted at $1.
#
# Disks are found by a magic string in their first bytes (no serial numbers, no labels: works the same under
# virtio, SATA or SCSI): XWHEPJOB1 the job disk (ext4: in/ = the job dir as staged, stdin), XWHEPOUT1 the result
# disk (raw: a tar stream written at 1 MiB). /job is an overlay of in/ (lower) and job/ (upper) on the job disk,
# so the kernel itself records which files the job created or changed: exactly job/'s regular files. The job runs
# as the unprivileged user xwjob in /job; its stdout, stderr and exit code and the files of job/ are written to
# the result disk, then the guest powers off. Every line this script prints on the console starts with
# "xwhep-guest: ".
SEED=${1:?usage: agent.sh SEED_DIR}
DISK=/xw/disk
OUT_SEEK=16 # 16 x 64 KiB = 1 MiB: the result stream's offset on the result disk
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "xwhep-guest: $*" >/dev/console 2>/dev/null || echo "xwhep-guest: $*"; }

poweroff_now() {
    sync
    # sysrq 'o' powers off at once: no init system to go through (the root disk is a throwaway overlay, and every
    # disk that matters is synced); poweroff -f where sysrq is off.
    echo 1 >/proc/sys/kernel/sysrq 2>/dev/null
    echo o >/proc/sysrq-trigger 2>/dev/null
    poweroff -f
    exit 0
}

magic_dev() { # the whole-disk block device whose first bytes are $1
    for d in /sys/block/*; do
        dev=/dev/${d##*/}
        [ -b "$dev" ] || continue
        m=$(dd if="$dev" bs=512 count=1 2>/dev/null | head -c ${#1})
        if [ "$m" = "$1" ]; then echo "$dev"; return 0; fi
    done
    return 1
}

write_results() { # tar of $1's log/ and job/ onto the result disk; log/end last: a cut-short stream shows
    : >"$1/log/end"
    set --  "$1" log/rc log/error log/stdout.txt log/stderr.txt job log/end
    dir=$1; shift
    names=""
    for n in "$@"; do [ -e "$dir/$n" ] && names="$names $n"; done
    # shellcheck disable=SC2086 # the names are ours, without blanks
    ( cd "$dir" && tar -cf - $names; echo $? >/tmp/xw-tar-rc ) |
        dd of="$OUTDEV" bs=65536 seek=$OUT_SEEK iflag=fullblock conv=notrunc 2>/tmp/xw-dd-err
    dd_rc=$?
    sync
    if [ "$dd_rc" -ne 0 ]; then
        say "results-failed: the results do not fit the result disk ($(tail -1 /tmp/xw-dd-err))"
        return 1
    fi
    say "results-written"
}

fail() { # report $1 as the agent's error (the host reports the job as ERROR), then power off
    say "error: $1"
    if [ -n "${OUTDEV:-}" ]; then
        rm -rf /tmp/xw-fail; mkdir -p /tmp/xw-fail/log
        echo "$1" >/tmp/xw-fail/log/error
        write_results /tmp/xw-fail
    fi
    poweroff_now
}

# once per boot, whoever starts it (an image may have both a unit and cloud-init's runcmd)
[ -d /run ] || mkdir /run
mkdir /run/xwhep-agent 2>/dev/null || exit 0

OUTDEV=$(magic_dev XWHEPOUT1) || fail "no result disk"
JOBDEV=$(magic_dev XWHEPJOB1) || fail "no job disk"
. "$SEED/xw/job.env" || fail "bad seed: no xw/job.env"
id xwjob >/dev/null 2>&1 || fail "no user xwjob in this image"

mkdir -p "$DISK" /job || fail "cannot create /xw/disk"
mount -t ext4 -o nodev,nosuid "$JOBDEV" "$DISK" || fail "cannot mount the job disk"
chmod 0700 "$DISK" # root only: the job reaches its files through /job, never stdin or the logs
rm -rf "$DISK/job" "$DISK/work" "$DISK/log"
mkdir -p "$DISK/in" "$DISK/job" "$DISK/work" "$DISK/log" || fail "cannot prepare the job disk"
chown -R xwjob: "$DISK/in" "$DISK/job" || fail "cannot give the job dir to xwjob"
chmod 0755 "$DISK/job"
mount -t overlay overlay -o "nodev,nosuid,lowerdir=$DISK/in,upperdir=$DISK/job,workdir=$DISK/work" /job ||
    fail "cannot mount the job dir (overlay)"
STDIN=/dev/null
[ -f "$DISK/stdin" ] && STDIN="$DISK/stdin"

if [ "${XW_NET:-0}" = 1 ]; then
    # QEMU user networking, restricted: only the host's forwards reach the guest; the guest reaches nothing
    ip link set lo up 2>/dev/null
    ip link set eth0 up 2>/dev/null
    ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
    ip route add default via 10.0.2.2 2>/dev/null
fi

[ -n "${XW_MAX_PROCS:-}" ] && ulimit -u "$XW_MAX_PROCS"
say "job-start"
# run.sh sets the job's environment, runs the contextualization script, then execs the command
env -i su -p -s /bin/sh xwjob -c ". '$SEED/xw/run.sh'" <"$STDIN" >"$DISK/log/stdout.txt" 2>"$DISK/log/stderr.txt"
rc=$?
say "job-end rc=$rc"
# whatever the job left running (daemons, background children) dies before its files are read
su -s /bin/sh xwjob -c 'kill -9 -1' >/dev/null 2>&1
umount /job 2>/dev/null || umount -l /job
echo "$rc" >"$DISK/log/rc"
write_results "$DISK"
umount "$DISK" 2>/dev/null
poweroff_now
