# xwhep guest agent, protocol 1 (see xwhep/vm/__init__.py). POSIX sh: runs under busybox ash (the minimal image's
# /init) and dash (distro images, started by their unit or cloud-init's runcmd), as root:
#
#     sh DISK/xw/agent.sh DISK DEVICE
#
# DISK is where the job disk (the block device DEVICE, first bytes XWHEPJOB1) is mounted, read-write. Its ext4
# holds in/ (the job dir as staged), stdin, and xw/ (this script, run.sh, job.env, the contextualization script).
# /job is an overlay of in/ (lower) and job/ (upper) on that disk, so the kernel itself records which files the
# job created or changed: exactly job/'s regular files. The job runs as the unprivileged user xwjob in /job; its
# exit code, stdout, stderr and the files of job/ are written as one tar stream on DEVICE past the end of the
# filesystem (byte XW_OUT_OFFSET of job.env), then the guest powers off. Every line this script prints on the
# console starts with "xwhep-guest: ".
DISK=${1:?usage: agent.sh DISK DEVICE}
DEV=${2:?usage: agent.sh DISK DEVICE}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "xwhep-guest: $*" >/dev/console 2>/dev/null || echo "xwhep-guest: $*"; }

poweroff_now() {
    sync
    # sysrq 'o' powers off at once: no init system to go through (a root disk is a throwaway overlay, and the job
    # disk is synced); poweroff -f where sysrq is off.
    echo 1 >/proc/sys/kernel/sysrq 2>/dev/null
    echo o >/proc/sysrq-trigger 2>/dev/null
    poweroff -f
    exit 0
}

write_results() { # tar of $1's log/ and job/ onto the device past the filesystem; log/end last (a cut-short
    : >"$1/log/end" # stream shows)
    dir=$1
    names=""
    for n in log/rc log/error log/stdout.txt log/stderr.txt job log/end; do
        [ -e "$dir/$n" ] && names="$names $n"
    done
    # shellcheck disable=SC2086 # the names are ours, without blanks
    (cd "$dir" && tar -cf - $names) |
        dd of="$DEV" bs=65536 seek=$((XW_OUT_OFFSET / 65536)) iflag=fullblock conv=notrunc 2>/tmp/xw-dd-err
    dd_rc=$?
    sync
    if [ "$dd_rc" -ne 0 ]; then
        say "results-failed: the results do not fit the job disk ($(tail -1 /tmp/xw-dd-err))"
        return 1
    fi
    say "results-written"
}

fail() { # report $1 as the agent's error (the host reports the job as ERROR), then power off
    say "error: $1"
    if [ -n "${XW_OUT_OFFSET:-}" ]; then
        rm -rf /tmp/xw-fail
        mkdir -p /tmp/xw-fail/log
        echo "$1" >/tmp/xw-fail/log/error
        write_results /tmp/xw-fail
    fi
    poweroff_now
}

# once per boot, whoever starts it (an image may have both a unit and cloud-init's runcmd)
[ -d /run ] || mkdir /run
mkdir /run/xwhep-agent 2>/dev/null || exit 0
mkdir -p /tmp

. "$DISK/xw/job.env" || fail "bad job disk: no xw/job.env"
[ -n "${XW_OUT_OFFSET:-}" ] || fail "bad job disk: no result offset"
id xwjob >/dev/null 2>&1 || fail "no user xwjob in this image"

# the disk is fresh (made by the worker for this run): nothing to clear. Its root becomes root's only: the job
# reaches its files through /job, never stdin, xw/ or the logs
chmod 0700 "$DISK"
mkdir -p "$DISK/in" "$DISK/job" "$DISK/work" "$DISK/log" /job /run/xw || fail "cannot prepare the job disk"
chown -R xwjob: "$DISK/in" "$DISK/job" || fail "cannot give the job dir to xwjob"
mount -t overlay overlay -o "nodev,nosuid,lowerdir=$DISK/in,upperdir=$DISK/job,workdir=$DISK/work" /job ||
    fail "cannot mount the job dir (overlay)"
# what the job user runs must be readable by it (the disk's root is not)
cp "$DISK/xw/run.sh" /run/xw/ && chmod 0644 /run/xw/run.sh || fail "cannot copy run.sh"
[ -f "$DISK/xw/script" ] && { cp "$DISK/xw/script" /run/xw/ && chmod 0644 /run/xw/script; }
STDIN=/dev/null
[ -f "$DISK/stdin" ] && STDIN="$DISK/stdin"

if [ "${XW_NET:-0}" = 1 ]; then
    # QEMU user networking, restricted: only the host's forwards reach the guest; the guest reaches nothing
    ip link set lo up 2>/dev/null
    ip link set eth0 up 2>/dev/null
    ip addr add 10.0.2.15/24 dev eth0 2>/dev/null
    ip route add default via 10.0.2.2 2>/dev/null
fi

if [ -n "${XW_MAX_PROCS:-}" ]; then
    ulimit -u "$XW_MAX_PROCS" 2>/dev/null || ulimit -p "$XW_MAX_PROCS" # ash: -u; dash: -p
fi
say "job-start"
# run.sh sets the job's environment, runs the contextualization script, then execs the command
env -i su -p -s /bin/sh xwjob -c "exec sh /run/xw/run.sh /run/xw" \
    <"$STDIN" >"$DISK/log/stdout.txt" 2>"$DISK/log/stderr.txt"
rc=$?
say "job-end rc=$rc"
# whatever the job left running (daemons, background children) dies before its files are read
su -s /bin/sh xwjob -c 'kill -9 -1' >/dev/null 2>&1
umount /job 2>/dev/null || umount -l /job
echo "$rc" >"$DISK/log/rc"
write_results "$DISK"
poweroff_now
