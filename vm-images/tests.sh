#!/bin/sh
# The in-VM tests (busybox sh), run by /init on a pure cgroup v2 kernel. They drive a real
# `iris-worker serve` through its CLI and check what it reports against the cgroup files.
# One console line per test, "PASS name: figures" or "FAIL name: why" (details follow as
# "  | ..."), then "SUMMARY passed=N failed=M". IRIS_VM_ONLY=a,b runs only the tests named.

W=/bin/iris-worker
STATE=/tmp/state
CG=/sys/fs/cgroup
export IRIS_WORKER_ADDR=127.0.0.1:8080
passed=0
failed=0

pass() { echo "PASS $1${2:+: $2}"; passed=$((passed + 1)); }
fail() { echo "FAIL $1: $2"; failed=$((failed + 1)); }
# Indented detail lines under a FAIL (stdin, at most 20 lines).
detail() { tail -n 20 | sed 's/^/  | /'; }
want() { [ -z "$IRIS_VM_ONLY" ] || case ",$IRIS_VM_ONLY," in *",$1,"*) true ;; *) false ;; esac; }
# The CLI, never hanging the run.
iw() { timeout 120 "$W" "$@"; }

# json_field KEY JSON: the first value of "KEY" (proto3 JSON: strings, enums and int64 quoted).
json_field() {
    printf '%s\n' "$2" | grep -o "\"$1\":\(\"[^\"]*\"\|[-0-9.]*\)" | head -n 1 | sed 's/^"[^"]*"://; s/"//g'
}
status() { iw task status --json "$1" 2>&1; }
state() { json_field state "$(status "$1")"; }
# wait_state TASK STATE SECONDS: polls until the task's state name ends with STATE; fails at
# once on another final state.
wait_state() {
    i=0
    while [ $i -lt $(($3 * 4)) ]; do
        case $(state "$1") in
            *"$2") return 0 ;;
            *SUCCEEDED | *FAILED | *KILLED) return 1 ;;
        esac
        sleep 0.25
        i=$((i + 1))
    done
    return 1
}
# The task's cgroup directory (task key: escaped id + "." + attempt), empty if none.
cgroup_dir() {
    key=$(printf '%s' "$1" | sed 's|/|_2f|g').0
    find "$CG" -type d -name "$key" 2>/dev/null | head -n 1
}

# start_worker [FLAG...]: the worker on its defaults, or with these flags too.
start_worker() {
    "$W" serve --listen 127.0.0.1:8080 --state-dir "$STATE" --cache-dir /tmp/cache \
        --rootfs /rootfs --worker-id vm "$@" >>/tmp/worker.log 2>&1 &
    WPID=$!
    i=0
    while ! iw task list >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -ge 240 ] || ! kill -0 "$WPID" 2>/dev/null; then return 1; fi
        sleep 0.25
    done
}

t_memory_max() {
    out=$(iw task run --wait --json --id vm/oom --memory 64M -- \
        sh -c 'head -c 268435456 /dev/zero | tail -c 268435456 >/dev/null' 2>&1)
    st=$(json_field state "$out")
    err=$(json_field error "$out")
    case $st in
        *FAILED) ;;
        *) fail memory_max "state '$st', want FAILED"; echo "$out" | detail; return ;;
    esac
    case $err in
        *"out of memory"*) pass memory_max "FAILED: $err" ;;
        *) fail memory_max "error '$err' does not say out of memory" ;;
    esac
}

# 100 MiB in a tmpfs file: shmem pages are charged to the cgroup of the task that writes them
# (/dev/shm is half the limit: 128 MiB), and stay charged until the task's mounts go away.
t_memory_peak() {
    out=$(iw task run --wait --json --id vm/peak --memory 256M -- \
        sh -c 'head -c 104857600 /dev/zero >/dev/shm/fill && sleep 1' 2>&1)
    st=$(json_field state "$out")
    peak=$(json_field memoryPeakMb "$out")
    case $st in
        *SUCCEEDED) ;;
        *) fail memory_peak "state '$st', want SUCCEEDED"; echo "$out" | detail; return ;;
    esac
    if [ "${peak:-0}" -ge 90 ] && [ "${peak:-0}" -le 110 ]; then
        pass memory_peak "memory_peak_mb $peak for 100 MiB written"
    else
        fail memory_peak "memory_peak_mb '$peak' not within 10 % of the 100 MiB written"
    fi
}

# The bomb's shell execs sleep after lighting the fuse, so the task stays up at the limit. The
# memory limit keeps the VM alive (and this test quick to fail) should pids.max not hold.
t_pids_max() {
    iw task run --json --id vm/bomb --pids 32 --memory 128M -- \
        sh -c 'f() { f | f & }; f; exec sleep 120' >/dev/null 2>&1
    if ! wait_state vm/bomb RUNNING 60; then
        fail pids_max "the task never ran: $(state vm/bomb)"
        return
    fi
    sleep 2
    max=0 min=1000
    for _ in 1 2 3 4 5 6; do
        n=$(json_field processCount "$(status vm/bomb)")
        n=${n:-0}
        [ "$n" -gt "$max" ] && max=$n
        [ "$n" -lt "$min" ] && min=$n
        sleep 0.5
    done
    dir=$(cgroup_dir vm/bomb)
    hits=$(sed -n 's/^max //p' "$dir/pids.events" 2>/dev/null)
    current=$(cat "$dir/pids.current" 2>/dev/null)
    iw task kill --grace-ms 200 vm/bomb >/dev/null 2>&1
    wait_state vm/bomb KILLED 60 || { fail pids_max "not KILLED after kill: $(state vm/bomb)"; return; }
    if [ "$max" -le 32 ] && [ "$min" -gt 1 ] && [ "${hits:-0}" -gt 0 ]; then
        pass pids_max "process_count $min..$max, pids.events max $hits"
    else
        fail pids_max "process_count ranged $min..$max (want 2..32), pids.current $current, pids.events max '${hits}'"
    fi
}

# restart_worker [FLAG...]: stops the worker (its tasks keep running) and starts it again.
restart_worker() {
    kill -TERM "$WPID"
    wait "$WPID" 2>/dev/null
    start_worker "$@"
}

# A task with no pids limit gets the worker's default in pids.max (4096); with a default small
# enough for the VM, a fork bomb without a limit meets it and stays killable.
t_pids_default() {
    iw task run --json --id vm/nolimit -- sleep 1000 >/dev/null 2>&1
    if ! wait_state vm/nolimit RUNNING 60; then
        fail pids_default "the task never ran: $(state vm/nolimit)"
        return
    fi
    default=$(cat "$(cgroup_dir vm/nolimit)/pids.max" 2>/dev/null)
    iw task kill --grace-ms 200 vm/nolimit >/dev/null 2>&1
    wait_state vm/nolimit KILLED 60
    if [ "$default" != 4096 ]; then
        fail pids_default "pids.max of a task without a limit is '$default', want 4096"
        return
    fi
    if ! restart_worker --default-pids-limit 40; then
        fail pids_default "the worker did not start with --default-pids-limit 40"
        return
    fi
    iw task run --json --id vm/nolimit-bomb --memory 128M -- \
        sh -c 'f() { f | f & }; f; exec sleep 120' >/dev/null 2>&1
    if wait_state vm/nolimit-bomb RUNNING 60; then
        sleep 2
        dir=$(cgroup_dir vm/nolimit-bomb)
        max=$(cat "$dir/pids.max" 2>/dev/null)
        hits=$(sed -n 's/^max //p' "$dir/pids.events" 2>/dev/null)
        n=$(json_field processCount "$(status vm/nolimit-bomb)")
        iw task kill --grace-ms 200 vm/nolimit-bomb >/dev/null 2>&1
        wait_state vm/nolimit-bomb KILLED 60 || { fail pids_default "the bomb was not KILLED"; return; }
    fi
    restart_worker || { fail pids_default "the worker did not start again"; return; }
    if [ "$max" = 40 ] && [ "${hits:-0}" -gt 0 ] && [ "${n:-0}" -le 40 ]; then
        pass pids_default "pids.max 4096 by default; a bomb without a limit under a default of 40: process_count $n, pids.events max $hits"
    else
        fail pids_default "the bomb's pids.max '$max' (want 40), pids.events max '$hits', process_count '$n'"
    fi
}

# resources.disk_bytes: the workdir alone, and the workdir and /tmp together, past 16 MiB.
t_disk() {
    for what in workdir both; do
        case $what in
            workdir) script='head -c 25165824 /dev/zero >/workdir/f; exec sleep 1000' ;;
            both) script='head -c 10485760 /dev/zero >/workdir/a; head -c 10485760 /dev/zero >/tmp/b; exec sleep 1000' ;;
        esac
        iw task run --json --id "vm/disk-$what" --disk 16M -- sh -c "$script" >/dev/null 2>&1
        if ! wait_state "vm/disk-$what" FAILED 120; then
            fail disk "vm/disk-$what is '$(state "vm/disk-$what")', want FAILED"
            iw task kill --grace-ms 200 "vm/disk-$what" >/dev/null 2>&1
            return
        fi
        err=$(json_field error "$(status "vm/disk-$what")")
        case $err in
            "disk limit of 16 MiB exceeded"*) ;;
            *) fail disk "vm/disk-$what: error '$err'"; return ;;
        esac
    done
    pass disk "FAILED with 'disk limit of 16 MiB exceeded' for the workdir, and for workdir + /tmp"
}

t_cpu_max() {
    iw task run --json --id vm/cpu --cpu-millicores 200 -- sh -c 'while :; do :; done' >/dev/null 2>&1
    if ! wait_state vm/cpu RUNNING 60; then
        fail cpu_max "the task never ran: $(state vm/cpu)"
        return
    fi
    sleep 1
    status vm/cpu >/dev/null
    sleep 4
    pct=$(json_field cpuPercent "$(status vm/cpu)")
    dir=$(cgroup_dir vm/cpu)
    limit=$(cat "$dir/cpu.max" 2>/dev/null)
    throttled=$(sed -n 's/^nr_throttled //p' "$dir/cpu.stat" 2>/dev/null)
    iw task kill --grace-ms 200 vm/cpu >/dev/null 2>&1
    wait_state vm/cpu KILLED 60 || { fail cpu_max "not KILLED after kill: $(state vm/cpu)"; return; }
    if [ "${throttled:-0}" -gt 0 ] && [ "${pct:-0}" -ge 10 ] && [ "${pct:-0}" -le 30 ]; then
        pass cpu_max "cpu_percent $pct, nr_throttled $throttled, cpu.max $limit"
    else
        fail cpu_max "cpu_percent '$pct' (want 20 +- 10), cpu.max '$limit', nr_throttled '$throttled'"
    fi
}

# Every process ignores SIGTERM: the kill must escalate, through cgroup.kill on v2.
t_kill() {
    iw task run --json --id vm/kill -- sh -c 'trap "" TERM; sleep 1000 & sleep 1000 & wait' >/dev/null 2>&1
    if ! wait_state vm/kill RUNNING 60; then
        fail kill "the task never ran: $(state vm/kill)"
        return
    fi
    dir=$(cgroup_dir vm/kill)
    i=0
    while [ "$(wc -l <"$dir/cgroup.procs" 2>/dev/null || echo 0)" -lt 3 ] && [ $i -lt 40 ]; do
        sleep 0.25
        i=$((i + 1))
    done
    procs=$(wc -l <"$dir/cgroup.procs" 2>/dev/null)
    iw task kill --grace-ms 300 vm/kill >/dev/null 2>&1
    if ! wait_state vm/kill KILLED 60; then
        fail kill "not KILLED: $(state vm/kill)"
        return
    fi
    if [ -z "$dir" ] || [ "${procs:-0}" -lt 3 ]; then
        fail kill "the task's cgroup '$dir' had ${procs:-no} processes, want 3"
    elif [ -d "$dir" ]; then
        fail kill "the task's cgroup $dir remains (procs: $(tr '\n' ' ' <"$dir/cgroup.procs"))"
    else
        pass kill "$procs processes killed, cgroup removed"
    fi
}

# mount is denied by capabilities too; unshare(CLONE_NEWUSER) needs none, only seccomp stops it.
t_seccomp() {
    out=$(iw task run --wait --json --id vm/seccomp -- sh -c \
        'grep "^Seccomp:" /proc/self/status; mount -t tmpfs x /tmp 2>&1; echo "mount=$?"; unshare -U true 2>&1; echo "unshare=$?"' 2>&1)
    if ! printf '%s\n' "$out" | grep -q '^Seccomp:[[:space:]]*2$'; then
        fail seccomp "no 'Seccomp: 2' in the task"
    elif printf '%s\n' "$out" | grep -q '^mount=0$'; then
        fail seccomp "mount succeeded"
    elif ! printf '%s\n' "$out" | grep -qi 'permission denied\|not permitted'; then
        fail seccomp "mount did not fail with EPERM"
    elif ! printf '%s\n' "$out" | grep -q 'unshare.*Operation not permitted'; then
        fail seccomp "unshare -U was not refused with EPERM"
    else
        pass seccomp "Seccomp: 2, mount and unshare -U refused"
        return
    fi
    printf '%s\n' "$out" | detail
}

t_restart() {
    # shellcheck disable=SC2016  # for the task's shell
    iw task run --json --id vm/restart -- \
        sh -c 'i=0; while [ $i -lt 10 ]; do echo "line $i"; i=$((i + 1)); sleep 1; done' >/dev/null 2>&1
    if ! wait_state vm/restart RUNNING 60; then
        fail restart "the task never ran: $(state vm/restart)"
        return
    fi
    sleep 2
    kill -9 "$WPID"
    wait "$WPID" 2>/dev/null
    if ! start_worker; then
        fail restart "the worker did not start again"
        detail </tmp/worker.log
        return
    fi
    after=$(state vm/restart)
    wait_state vm/restart SUCCEEDED 60
    final=$(state vm/restart)
    lines=$(iw task logs vm/restart 2>&1)
    want_lines=$(seq 0 9 | sed 's/^/line /')
    case $after in
        *RUNNING) ;;
        *) fail restart "after the restart the task was '$after', want RUNNING"; return ;;
    esac
    case $final in
        *SUCCEEDED) ;;
        *) fail restart "the adopted task ended '$final', want SUCCEEDED"; return ;;
    esac
    if [ "$lines" = "$want_lines" ]; then
        pass restart "RUNNING again after kill -9 and restart, SUCCEEDED with all 10 lines"
    else
        fail restart "the log is not 'line 0'..'line 9'"
        printf '%s\n' "$lines" | detail
    fi
}

# Tasks cannot drive the worker: a task's connect() to the worker's port on any local address
# gets EPERM from the cgroup connect hook, while its own port works and the host (this shell)
# still reaches the worker.
t_isolation() {
    # shellcheck disable=SC2016  # for the task's shell
    script='mkdir -p /tmp/www && echo task-port-ok >/tmp/www/index.html
httpd -f -p "$IRIS_PORT_WEB" -h /tmp/www & web=$!
sleep 0.5
for a in 127.0.0.1 127.0.0.2 0.0.0.0; do
    echo "worker $a: $(timeout 5 wget -q -O - "http://$a:8080/health" 2>&1 | tr "\n" " ")"
done
echo "own port: $(timeout 5 wget -q -O - "http://127.0.0.1:$IRIS_PORT_WEB/" 2>&1)"
kill $web'
    out=$(iw task run --wait --id vm/isolation --port web -- sh -c "$script" 2>&1)
    worker=$(printf '%s\n' "$out" | grep '^worker ')
    health=$(timeout 10 wget -q -O - http://127.0.0.1:8080/health 2>&1)
    figures=$(timeout 10 wget -q -O - http://127.0.0.1:8080/api/worker 2>&1)
    if [ "$(printf '%s\n' "$worker" | grep -c 'Operation not permitted')" -ne 3 ]; then
        fail isolation "the task reached the worker (want EPERM on 127.0.0.1, 127.0.0.2, 0.0.0.0)"
    elif ! printf '%s\n' "$out" | grep -q '^own port: task-port-ok$'; then
        fail isolation "the task's own port did not answer"
    elif [ "$health" != "ok" ]; then
        fail isolation "the host cannot reach the worker: '$health'"
    elif ! printf '%s' "$figures" | grep -q '"taskIsolation":"on: '; then
        fail isolation "the worker does not report task isolation on"
    else
        pass isolation "EPERM on 3 local addresses, own port and host access fine"
        return
    fi
    printf '%s\n' "$out" "$figures" | detail
}

t_no_leftovers() {
    kill -TERM "$WPID"
    wait "$WPID" 2>/dev/null
    out=$(timeout 120 "$W" cleanup --state-dir "$STATE" --all 2>&1) || {
        fail no_leftovers "cleanup failed"
        printf '%s\n' "$out" | detail
        return
    }
    left=$(find "$CG" -mindepth 1 -type d ! -path "$CG/init.scope")
    # shellcheck disable=SC2009  # busybox has no pgrep
    procs=$(ps -o pid,args | grep '[i]ris-worker supervise')
    if [ -n "$left" ]; then
        fail no_leftovers "cgroups remain: $(printf '%s\n' "$left" | tr '\n' ' ')"
    elif [ -n "$procs" ]; then
        fail no_leftovers "supervisor pids remain: $(printf '%s\n' "$procs" | tr '\n' ' ')"
    else
        pass no_leftovers
    fi
}

if start_worker; then
    for t in memory_max memory_peak pids_max pids_default disk cpu_max kill seccomp isolation restart; do
        want $t && "t_$t"
    done
    want no_leftovers && t_no_leftovers
else
    fail worker "iris-worker serve did not answer"
fi
if [ $failed -gt 0 ] && [ -s /tmp/worker.log ]; then
    echo "worker log (last lines):"
    detail </tmp/worker.log
fi
echo "SUMMARY passed=$passed failed=$failed"
