#!/usr/bin/env bash
# A throwaway one-node Ceph cluster for the RBD tests and benchmark rows:
# one monitor and one OSD with the in-memory object store (memstore), bound
# to 127.0.0.1, authentication off, pools of size 1. No systemd: the daemons
# run in the foreground as children of this script's caller and are stopped
# by their process ids.
#
#   ceph-cluster.sh start DIR [--watch PID] [--pool NAME]
#       Creates the cluster in DIR (a new or empty directory), waits until
#       the pool (default "rbd") is ready for RBD images and prints the
#       line `CEPH_CONF=DIR/ceph.conf`. Clients then use `-c DIR/ceph.conf`
#       (rbd, rados, ceph) or `:conf=DIR/ceph.conf` (rbd: image specs).
#       With --watch, the cluster stops by itself once process PID exits,
#       and DIR is removed (a test process that ends, or dies, leaves
#       neither daemons nor files behind).
#   ceph-cluster.sh stop DIR
#       Stops the daemons started in DIR (by the pids in DIR/*.pid).
#
# Needs the packages ceph-mon, ceph-osd and ceph-common (see
# scripts/install-peers.sh). Takes about ten seconds to start.
set -euo pipefail

usage() {
    echo "usage: $0 start DIR [--watch PID] [--pool NAME] | stop DIR" >&2
    exit 2
}

# Stops the daemons whose pid files are in $1, monitor last.
stop_cluster() {
    local dir=$1 name pid
    for name in watch osd.0 mon.a; do
        [[ -f $dir/$name.pid ]] || continue
        pid=$(<"$dir/$name.pid")
        rm -f "$dir/$name.pid"
        [[ $pid =~ ^[0-9]+$ ]] || continue
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    echo "ceph-cluster: no free port found" >&2
    exit 1
}

# Waits up to $2 seconds for `ceph ARGS...` ($3...) to succeed.
wait_for() {
    local what=$1 secs=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "ceph-cluster: timed out waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

start_cluster() {
    local dir=$1 watch=$2 pool=$3
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -n $(ls -A "$dir") ]]; then
        echo "ceph-cluster: $dir is not empty" >&2
        exit 1
    fi
    for cmd in ceph-mon ceph-osd ceph monmaptool uuidgen; do
        command -v "$cmd" >/dev/null || {
            echo "ceph-cluster: $cmd not found (run scripts/install-peers.sh)" >&2
            exit 1
        }
    done
    local conf=$dir/ceph.conf fsid port
    fsid=$(uuidgen)
    port=$(free_port)
    mkdir -p "$dir/mon" "$dir/osd0" "$dir/run" "$dir/log"
    cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
run dir = $dir/run
admin socket = $dir/run/\$name.\$pid.asok
log file = $dir/log/\$name.log
pid file =
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
ms bind msgr1 = false

[mon]
mon data = $dir/mon

[osd]
osd data = $dir/osd0
osd objectstore = memstore
memstore device bytes = 8589934592
osd max object name len = 460
osd max object namespace len = 64
EOF
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" >"$dir/log/mkfs-mon.out" 2>&1
    ceph-mon -c "$conf" -f -i a </dev/null >"$dir/log/mon.a.out" 2>&1 &
    echo $! >"$dir/mon.a.pid"
    if [[ -n $watch ]]; then
        # Stops the cluster once the watched process is gone. Its own pid
        # is recorded so that `stop` ends it too.
        (
            exec </dev/null >/dev/null 2>&1
            while kill -0 "$watch" 2>/dev/null; do sleep 1; done
            rm -f "$dir/watch.pid"
            stop_cluster "$dir"
            rm -rf "$dir"
        ) &
        echo $! >"$dir/watch.pid"
    fi
    local ceph=(ceph -c "$conf" --connect-timeout 10)
    wait_for "the monitor" 30 "${ceph[@]}" mon stat
    local uuid
    uuid=$(uuidgen)
    "${ceph[@]}" osd new "$uuid" >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >"$dir/log/mkfs-osd.out" 2>&1
    ceph-osd -c "$conf" -f -i 0 </dev/null >"$dir/log/osd.0.out" 2>&1 &
    echo $! >"$dir/osd.0.pid"
    wait_for "the OSD" 60 bash -c "${ceph[*]} osd dump | grep -q '^osd.0 up'"
    "${ceph[@]}" osd pool create "$pool" 8 8 >/dev/null 2>&1
    "${ceph[@]}" osd pool application enable "$pool" rbd >/dev/null 2>&1
    # `ceph pg stat` needs a manager daemon; listing the pool's objects
    # answers once every placement group is active.
    wait_for "the pool's placement groups" 60 timeout 10 rados -c "$conf" -p "$pool" ls
    echo "CEPH_CONF=$conf"
}

[[ $# -ge 2 ]] || usage
cmd=$1 dir=$2
shift 2
case $cmd in
    start)
        watch="" pool=rbd
        while [[ $# -gt 0 ]]; do
            case $1 in
                --watch) watch=${2:?}; shift 2 ;;
                --pool) pool=${2:?}; shift 2 ;;
                *) usage ;;
            esac
        done
        # Whatever fails on the way stops what was started.
        trap 'rc=$?; if ((rc != 0)); then stop_cluster "$dir"; fi' EXIT
        start_cluster "$dir" "$watch" "$pool"
        trap - EXIT
        ;;
    stop) stop_cluster "$dir" ;;
    *) usage ;;
esac
