# shellcheck shell=bash
# Shared by scripts/drills.sh and scripts/swarm-drills.sh (sourced, not run): processes, the
# PASS/FAIL report (counting in the caller's `checks` and `failures`, naming its `drill`), times
# and free ports. The caller defines `log`.

alive() { [ -n "$1" ] && [ -e "/proc/$1" ] && [ "$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

wait_gone() { # pid seconds: true once the process has exited
    local i
    for ((i = 0; i < $2 * 10; i++)); do alive "$1" || return 0; sleep 0.1; done
    ! alive "$1"
}

stop_process() { # pid seconds: SIGTERM, then SIGKILL after `seconds`; reaps our children
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null || true
    wait_gone "$1" "$2" || { log "pid $1 ignored SIGTERM for $2 s; killing it"; kill -KILL "$1" 2>/dev/null || true; wait_gone "$1" 5 || true; }
    wait "$1" 2>/dev/null || true
}

# shellcheck disable=SC2154 # checks, failures and drill are the caller's
pass() { checks=$((checks + 1)); echo "PASS  $drill: $*"; }
# shellcheck disable=SC2154
fail() { checks=$((checks + 1)); failures=$((failures + 1)); echo "FAIL  $drill: $*"; }
note() { echo "      $drill: $*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" -v p="${2:-1}" 'BEGIN { printf "%.*f", p, b - a }'; } # t0 [decimals]

# Runs the caller's `cleanup` on exit, ends on Ctrl-C or SIGTERM, and sends the script SIGTERM
# once `limit` seconds have passed; the watcher's pid goes to `watchdog`.
arm_watchdog() { # limit name
    trap cleanup EXIT
    trap 'log "interrupted"; exit 130' INT
    trap 'log "stopped (time limit or SIGTERM)"; exit 143' TERM
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "$1" & sleeper=$!
        wait "$sleeper"
        echo "$2: time limit of ${1}s reached" >&2
        kill -TERM $$
    ) &
    # shellcheck disable=SC2034 # the caller's cleanup stops it
    watchdog=$!
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
