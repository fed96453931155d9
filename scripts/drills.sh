#!/usr/bin/env bash
# Fault drills against the real release binary (target/release/previewd), run by scripts/test.sh
# after `cargo test` (not a cargo test: it needs root, a bind mount and a second Docker engine);
# takes about a minute.
#
#   1. docker-restart: the Docker engine stops while three previews run and a launch is in flight,
#      a launch is tried while it is down, then the engine starts again and restarts the previews.
#      Checks /healthz during and after, that every preview answers through nginx again within
#      30 s with its route on its container's current port, that the interrupted launch is fully
#      up or fully gone, that nothing is left orphaned, and that `nginx -t` passes.
#   2. docker-restart-ports-taken: the same restart, but another process listens on the
#      previews' host ports while the engine is down (answering 418), so Docker cannot restart
#      them: previewd must bring each back as a copy on another port and route it there.
#   3. sites-readonly: the nginx sites dir becomes read-only (bind mount, or chattr +i). A launch
#      must fail with a message naming the path and the problem, leave no temp file, vhost or
#      container behind, and not disturb the running previews; once writable, a launch works.
#
# The machine's own dockerd is never stopped: the drills start a second engine of their own
# (own socket, data root, exec root, containerd, pid file and bridge; no iptables changes) and
# copy the demo image into it. Everything is removed on exit, also on Ctrl-C or a timeout.
# Prints PASS/FAIL per check; exits 1 if any check failed, 2 if the drills could not run.
# Usage: scripts/drills.sh        (env: DRILLS_TIME_LIMIT seconds, default 180)
#
# previewd publishes previews on ports it picks below the kernel's ephemeral range, so the two
# engines' containers do not compete for ports.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/drill-lib.sh
source scripts/drill-lib.sh

BIN=$PWD/target/release/previewd
IMAGE=previewd-demo:latest
LIMIT=${DRILLS_TIME_LIMIT:-180} # the watchdog; cleanup after it takes at most about a minute
RECOVERY=30 # seconds the previews may take to answer again once the engine is back

log() { echo "drills: $*" >&2; }
die() { echo "drills: cannot run: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (a second dockerd, a bind mount, a bridge)"
for tool in dockerd docker docker-proxy nginx curl jq python3 ip mount; do
    command -v "$tool" >/dev/null || die "$tool is not installed (scripts/setup.sh installs what previewd needs)"
done
[ -x "$BIN" ] || die "$BIN is missing: cargo build --release"
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "$IMAGE is not on the main engine: run scripts/setup.sh"

work=$(mktemp -d /tmp/previewd-drills.XXXXXX)
sock=$work/docker.sock
engine=          # pid of the second dockerd
daemon=          # pid of the previewd being drilled
holder=          # pid of the port holder
held_ports=      # the ports it holds
declare -A old_port=() # host port of each preview before the engine restart
inflight=        # pid of the curl of the in-flight launch
watchdog=
readonly_mount=  # the sites dir while it is bind-mounted read-only
immutable=       # the sites dir while it is chattr +i
state_dirs=()
failures=0
checks=0
drill=setup

# --- cleanup, time limit ----------------------------------------------------------------------


cleanup() {
    local rc=$? dir pid mnt
    set +e
    trap - EXIT INT TERM
    [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
    if [ -n "$readonly_mount" ]; then umount "$readonly_mount" 2>/dev/null || umount -l "$readonly_mount"; fi
    [ -n "$immutable" ] && chattr -i "$immutable"
    [ -n "$holder" ] && stop_process "$holder" 5
    [ -n "$inflight" ] && stop_process "$inflight" 5
    [ -n "$daemon" ] && stop_process "$daemon" 15
    for dir in "${state_dirs[@]}"; do # a managed nginx left behind by a previewd that was killed
        pid=$(cat "$dir/nginx/nginx.pid" 2>/dev/null)
        if [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '^nginx: master'; then
            kill -QUIT "$pid"; wait_gone "$pid" 10 || kill -KILL "$pid"
        fi
    done
    if alive "$engine"; then
        E ps -aq 2>/dev/null | xargs -r docker -H "unix://$sock" rm -f >/dev/null 2>&1
        stop_process "$engine" 20
    fi
    # containerd and shims of the second engine, should its shutdown have left any (their
    # command lines name our work dir).
    for pid in /proc/[0-9]*; do
        case $({ tr '\0' ' ' <"$pid/cmdline"; } 2>/dev/null) in
            *containerd*"$work/"*) kill -KILL "${pid#/proc/}" 2>/dev/null ;;
        esac
    done
    awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt"; done
    [ -n "${bridge:-}" ] && ip link del "$bridge" 2>/dev/null
    # The preview networks' bridges the second engine made (pv-<hash of the instance>…): its
    # data root is gone, so nothing would remove them, and their routes would shadow a subnet
    # another network gets later.
    for dir in "${state_dirs[@]}"; do
        tag=$(printf %s "${dir##*/}" | sha256sum | cut -c1-6)
        ip -o link show | awk -F': ' -v p="pv-$tag" 'index($2, p) == 1 { sub(/@.*/, "", $2); print $2 }' |
            while read -r link; do ip link del "$link" 2>/dev/null; done
    done
    rm -rf "$work"
    if [ "$rc" = 0 ] && [ "$failures" -gt 0 ]; then rc=1; fi
    exit "$rc"
}
arm_watchdog "$LIMIT" drills

# --- the second Docker engine -------------------------------------------------------------------

E() { docker -H "unix://$sock" "$@"; }

# A bridge of our own (docker0 belongs to the main engine) on a free /24, so that `-p
# 127.0.0.1::PORT` works through docker-proxy without touching iptables.
for _ in 1 2 3 4 5 6 7 8 9 10; do
    candidate=pvdrill$((RANDOM % 10000))
    net=10.$((200 + RANDOM % 50)).$((RANDOM % 250))
    if ! ip link show "$candidate" >/dev/null 2>&1 && ! ip -4 route | grep -q "^$net\."; then
        bridge=$candidate
        break
    fi
done
[ -n "${bridge:-}" ] || die "no free bridge name or subnet found"
ip link add "$bridge" type bridge || die "cannot create bridge $bridge"
ip addr add "$net.1/24" dev "$bridge"
ip link set "$bridge" up
echo '{}' >"$work/daemon.json" # not /etc/docker/daemon.json: that one names the main data root

start_engine() {
    dockerd --config-file "$work/daemon.json" --host "unix://$sock" --pidfile "$work/docker.pid" \
        --data-root "$work/docker-data" --exec-root "$work/docker-exec" --storage-driver vfs \
        --bridge "$bridge" --iptables=false --ip-masq=false --ip-forward=false >>"$work/dockerd.log" 2>&1 &
    engine=$!
    local i
    for ((i = 0; i < 300; i++)); do
        E version >/dev/null 2>&1 && return 0
        alive "$engine" || break
        sleep 0.1
    done
    log "the second dockerd did not come up; its log ends with:"
    tail -n 20 "$work/dockerd.log" >&2
    return 1
}

stop_engine() {
    stop_process "$engine" 30
    ! alive "$engine"
}

t=$(now)
start_engine || die "cannot start a second dockerd next to the main one (flags above, log in $work/dockerd.log)"
docker save "$IMAGE" | E load >/dev/null || die "cannot copy $IMAGE into the second engine"
log "second dockerd (pid $engine, bridge $bridge $net.0/24, vfs) up with $IMAGE in $(since "$t") s"

# --- previewd -----------------------------------------------------------------------------------

hash=$(printf %s drill | "$BIN" hash-password)

# Sets instance, state, sites, api_port, nginx_port and writes $state/config.yml.
configure() { # instance
    instance=$1
    state=$work/$instance
    sites=$state/nginx/sites
    api_port=$(free_port)
    nginx_port=$(free_port)
    state_dirs+=("$state")
    mkdir -p "$state"
    cat >"$state/config.yml" <<EOF
instance: $instance
listen: 127.0.0.1:$api_port
base_domain: preview.localhost
public_url: "http://{host}:$nginx_port"
state_dir: $state
nginx:
  listen: 127.0.0.1:$nginx_port
  template: $PWD/templates/vhost.conf.tera
images:
  demo: {image: $IMAGE, port: 3000, command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www], pull: never}
  slow: {image: $IMAGE, port: 3000, command: [/bin/sh, -c, "sleep 3; exec /bin/busybox httpd -f -p 3000 -h /www"], pull: never}
users: [{name: drill, password_hash: "$hash"}]
EOF
}

start_previewd() {
    DOCKER_HOST="unix://$sock" RUST_LOG=info "$BIN" serve --config "$state/config.yml" 2>>"$state/previewd.log" &
    daemon=$!
    local i
    for ((i = 0; i < 200; i++)); do
        [ "$(healthz)" = 200 ] && return 0
        alive "$daemon" || break
        sleep 0.1
    done
    log "previewd did not become healthy; its log ends with:"
    tail -n 20 "$state/previewd.log" >&2
    return 1
}

stop_previewd() {
    stop_process "$daemon" 20
    daemon=
}

healthz() { curl -s -m 5 -o "$work/healthz.json" -w '%{http_code}' "http://127.0.0.1:$api_port/healthz" || true; }

launch() { # image name: prints the HTTP status, the body goes to $work/launch.txt
    curl -s -m 40 -o "$work/launch.txt" -w '%{http_code}' -u drill:drill \
        -d "image_name=$1&container_name=$2" "http://127.0.0.1:$api_port/launch" || true
}

through_nginx() { # name: HTTP status of the preview's page through nginx; the page goes to $work/page.html
    curl -s -m 3 -o "$work/page.html" -w '%{http_code}' --resolve "$1.preview.localhost:$nginx_port:127.0.0.1" \
        "http://$1.preview.localhost:$nginx_port/" || true
}

serves() { # name: its own page answers 200 through nginx
    [ "$(through_nginx "$1")" = 200 ] && grep -q "<h1>Preview: $1</h1>" "$work/page.html"
}

vhost() { echo "$sites/previewd.$instance.$1.conf"; }
vhost_port() { sed -n 's/.*proxy_pass http:\/\/127\.0\.0\.1:\([0-9]*\);.*/\1/p' "$(vhost "$1")" 2>/dev/null; }

containers() { # [name]: "id state" of the instance's containers (of one preview), on the second engine
    local filters=(--filter "label=previewd.instance=$instance")
    [ $# = 1 ] && filters+=(--filter "label=previewd.slug=$1")
    E ps -a --no-trunc "${filters[@]}" --format '{{.ID}} {{.State}}'
}

host_port() { E port "$1" 3000/tcp 2>/dev/null | sed -n 's/^127\.0\.0\.1:\([0-9]*\)$/\1/p' | head -n 1; }

# Every container of the instance runs and is routed to its current port, and every vhost has
# one: prints what is not so, and fails if anything is not.
audit() {
    local id st name port problems=0 file
    while read -r id st; do
        [ -n "$id" ] || continue
        name=$(E inspect -f '{{ index .Config.Labels "previewd.slug" }}' "$id")
        port=$(host_port "$id")
        if [ "$st" != running ]; then
            echo "container ${id:0:12} of $name is $st"; problems=1
        elif [ ! -f "$(vhost "$name")" ]; then
            echo "container ${id:0:12} of $name runs on port $port with no vhost"; problems=1
        elif [ "$(vhost_port "$name")" != "$port" ]; then
            echo "vhost of $name points at port $(vhost_port "$name"), its container runs on port $port"; problems=1
        fi
    done < <(containers)
    for file in "$sites"/previewd."$instance".*.conf; do
        [ -e "$file" ] || continue
        name=${file##*/previewd."$instance".}; name=${name%.conf}
        if ! containers "$name" | grep -q ' running$'; then echo "vhost of $name with no running container"; problems=1; fi
    done
    if [ "$(containers | awk '{ print $1 }' | xargs -r -n1 docker -H "unix://$sock" inspect -f '{{ index .Config.Labels "previewd.slug" }}' | sort | uniq -d)" ]; then
        echo "a preview has several containers"; problems=1
    fi
    return "$problems"
}

nginx_test() { nginx -t -p "$state/nginx" -c "$state/nginx/nginx.conf" -e "$state/nginx/error.log" 2>&1; }

check_nginx_config() {
    local out
    if out=$(nginx_test); then pass "nginx -t on the managed config passes"; else fail "nginx -t on the managed config fails: $out"; fi
}

show_log() { # on failure: what previewd said
    local lines
    lines=$(sed 's/\x1b\[[0-9;]*m//g' "$state/previewd.log" | grep -E 'WARN|ERROR' | tail -n 25 || true)
    [ -n "$lines" ] && { echo "      previewd's warnings and errors ($state/previewd.log):"; printf '        %s\n' "${lines//$'\n'/$'\n'        }"; }
    return 0
}

# Port holder: answers every connection with "418 stale route" on the given ports, so Docker
# cannot give a restarted container its old port, and a route left pointing there shows.
hold_ports() {
    python3 - "$@" >"$work/holder.out" 2>&1 <<'EOF' &
import socket, sys, threading
def serve(s):
    while True:
        c, _ = s.accept()
        try:
            c.recv(4096)
            c.sendall(b"HTTP/1.0 418 Stale route\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        c.close()
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(port)))
    s.listen(64)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
EOF
    holder=$!
    held_ports="$*"
    local i
    for ((i = 0; i < 100; i++)); do
        grep -q ready "$work/holder.out" && return 0
        alive "$holder" || break
        sleep 0.1
    done
    cat "$work/holder.out" >&2
    return 1
}

# After the engine started at `t0`: within RECOVERY s every preview answers 200 through nginx
# with its own page, and /healthz is healthy.
recovered() { # t0 name...
    local t0=$1 name ok=
    shift
    while awk -v a="$t0" -v b="$(now)" -v l="$RECOVERY" 'BEGIN { exit !(b - a < l) }'; do
        ok=1
        for name in "$@"; do serves "$name" || { ok=; break; }; done
        [ -n "$ok" ] && break
        sleep 0.2
    done
    if [ -n "$ok" ]; then
        pass "every preview answers 200 through nginx again, $(since "$t0") s after the engine started"
    else
        for name in "$@"; do
            note "$name: through nginx $(through_nginx "$name"), vhost port $(vhost_port "$name"), containers: $(containers "$name" | tr '\n' ' ')"
        done
        fail "not every preview answers 200 through nginx within $RECOVERY s of the engine starting"
    fi
    local code
    code=$(healthz)
    if [ "$code" = 200 ]; then pass "/healthz is healthy again"; else fail "/healthz after the restart: HTTP $code $(cat "$work/healthz.json")"; fi
}

# Each preview's vhost points at the port its running container has now (old ports in old_port).
routes_follow() { # name...
    local name id now_port
    for name in "$@"; do
        id=$(containers "$name" | awk '$2 == "running" { print $1 }' | tail -n 1)
        now_port=$(host_port "${id:-none}")
        if [ -n "$id" ] && [ -n "$now_port" ] && [ "$(vhost_port "$name")" = "$now_port" ]; then
            if [ "$now_port" = "${old_port[$name]}" ]; then
                pass "the route of $name is right: its container is back on its old port $now_port"
            else
                pass "the route of $name follows its container from port ${old_port[$name]} to $now_port"
            fi
        else
            fail "the route of $name: vhost port $(vhost_port "$name"), running container ${id:0:12} on port ${now_port:-none} (was ${old_port[$name]})"
        fi
    done
}

launch_all() { # name...: launches the demo image under each name; sets old_port[name]
    local name code
    for name in "$@"; do
        code=$(launch demo "$name")
        if [ "$code" = 200 ] && serves "$name"; then
            old_port[$name]=$(vhost_port "$name")
        else
            fail "launch of $name: HTTP $code ($(cat "$work/launch.txt")), through nginx $(through_nginx "$name")"
            return 1
        fi
    done
    pass "$# previews run and answer 200 through nginx (ports ${old_port[*]})"
}

check_no_orphans() {
    local problems
    if problems=$(audit); then
        pass "no orphan: every container of the instance runs and is routed to its port, every vhost has a running container"
    else
        fail "orphans: $(tr '\n' ';' <<<"$problems")"
    fi
}

# --- drill 1: the Docker engine restarts ---------------------------------------------------------

drill_docker_restart() {
    drill="docker-restart"
    configure "drills-$$-a"
    if ! start_previewd; then fail "previewd does not start against the second engine"; return; fi
    local name code st t0 ok line err i
    local running=(alpha beta gamma)
    old_port=()
    launch_all "${running[@]}" || return

    # A launch of the slow image (sleep 3 before httpd listens), cut off in its health step.
    curl -s -N -m 60 -H 'Accept: application/x-ndjson' -u drill:drill -d 'image_name=slow&container_name=inflight' \
        "http://127.0.0.1:$api_port/launch" >"$work/inflight.ndjson" 2>&1 &
    inflight=$!
    for ((i = 0; i < 150; i++)); do grep -q '"step":"health"' "$work/inflight.ndjson" && break; sleep 0.1; done
    if ! grep -q '"step":"health"' "$work/inflight.ndjson"; then
        fail "the in-flight launch never reached its health step: $(cat "$work/inflight.ndjson")"
    fi

    t0=$(now)
    if ! stop_engine; then fail "the second dockerd does not stop"; return; fi
    note "the engine stopped (SIGTERM) in $(since "$t0") s, during the in-flight launch's health step"

    # /healthz must say Docker is unreachable within a few seconds.
    t0=$(now); ok=
    for ((i = 0; i < 50; i++)); do
        code=$(healthz)
        if [ "$code" = 503 ] && [ "$(jq -r .docker.ok "$work/healthz.json")" = false ]; then ok=1; break; fi
        sleep 0.1
    done
    if [ -n "$ok" ]; then
        pass "/healthz answers 503 within $(since "$t0") s of the engine stopping; docker.error: $(jq -r .docker.error "$work/healthz.json")"
    else
        fail "/healthz does not report Docker down within 5 s: HTTP $code $(cat "$work/healthz.json")"
    fi

    # A launch while Docker is down.
    t0=$(now)
    code=$(launch demo outage)
    err=$(jq -r .error "$work/launch.txt" 2>/dev/null || cat "$work/launch.txt")
    if [ "$code" = 503 ] && grep -qi 'docker' <<<"$err"; then
        pass "a launch while the engine is down fails at once ($(since "$t0") s) with HTTP 503: $err"
    else
        fail "a launch while the engine is down: HTTP $code after $(since "$t0") s: $err (expected 503 naming Docker)"
    fi

    # The in-flight launch ends now, one way or the other.
    wait_gone "$inflight" 30 || true
    wait "$inflight" 2>/dev/null || true
    inflight=
    line=$(tail -n 1 "$work/inflight.ndjson")
    note "the in-flight launch ended with: $line"

    t0=$(now)
    if ! start_engine; then fail "the second dockerd does not start again"; return; fi
    note "the engine is back after $(since "$t0") s"
    recovered "$t0" "${running[@]}"
    routes_follow "${running[@]}"

    # The interrupted launch and the one tried during the outage: fully up and routed, or fully
    # gone. previewd gets a few seconds to settle.
    for name in inflight outage; do
        for ((i = 0; i < 50; i++)); do
            st=$(containers "$name" | awk '{ print $2 }' | tr '\n' ' ')
            if [ -z "$st" ] && [ ! -e "$(vhost "$name")" ]; then break; fi
            if [ "$st" = "running " ] && serves "$name"; then break; fi
            sleep 0.2
        done
        if [ -z "$st" ] && [ ! -e "$(vhost "$name")" ]; then
            pass "the $name launch left nothing behind: no container, no vhost"
        elif [ "$st" = "running " ] && serves "$name"; then
            pass "the $name preview is fully up: one running container, routed, answering 200"
        else
            fail "the $name launch is half done 10 s after recovery: containers [${st% }], vhost $([ -e "$(vhost "$name")" ] && echo present || echo absent), $(E ps -a --filter "label=previewd.instance=$instance" --filter "label=previewd.slug=$name" --format '{{.Names}} {{.Status}}' | tr '\n' ' ')"
        fi
    done

    code=$(launch demo delta)
    if [ "$code" = 200 ] && serves delta; then
        pass "a new launch after the restart works"
    else
        fail "a new launch after the restart: HTTP $code ($(cat "$work/launch.txt")), through nginx $(through_nginx delta)"
    fi

    check_no_orphans
    check_nginx_config
}

# --- drill 2: the previews' ports are taken while the engine is down -----------------------------

# Another process (another engine's docker-proxy, any service) binds the previews' host ports
# while the engine is down. Docker must restart them elsewhere and previewd route them there.
drill_ports_taken() {
    drill="docker-restart-ports-taken"
    alive "$engine" || start_engine || { fail "the second dockerd is not running"; return; }
    configure "drills-$$-b"
    if ! start_previewd; then fail "previewd does not start against the second engine"; return; fi
    local running=(alpha beta gamma) t0
    old_port=()
    launch_all "${running[@]}" || return
    t0=$(now)
    if ! stop_engine; then fail "the second dockerd does not stop"; return; fi
    note "the engine stopped (SIGTERM) in $(since "$t0") s"
    if ! hold_ports "${old_port[@]}"; then fail "cannot bind the old ports ${old_port[*]}"; return; fi
    note "another process now listens on the old ports ${old_port[*]} (answering 418)"
    t0=$(now)
    if ! start_engine; then fail "the second dockerd does not start again"; return; fi
    note "the engine is back after $(since "$t0") s"
    recovered "$t0" "${running[@]}"
    routes_follow "${running[@]}"
    check_no_orphans
    check_nginx_config
    stop_process "$holder" 5
    holder=
}

# --- drill 3: the sites dir is not writable ---------------------------------------------------

make_readonly() { # dir: read-only bind mount, or chattr +i where mounts are not permitted
    if mount --bind "$1" "$1" 2>/dev/null; then
        readonly_mount=$1
        if mount -o remount,ro,bind "$1" 2>/dev/null; then note "$1 is now a read-only bind mount"; return 0; fi
        umount "$1"; readonly_mount=
    fi
    if chattr +i "$1" 2>/dev/null; then immutable=$1; note "$1 is now immutable (chattr +i)"; return 0; fi
    return 1
}

make_writable() {
    if [ -n "$readonly_mount" ]; then umount "$readonly_mount"; readonly_mount=; fi
    if [ -n "$immutable" ]; then chattr -i "$immutable"; immutable=; fi
}

drill_sites_readonly() {
    drill="sites-readonly"
    alive "$engine" || start_engine || { fail "the second dockerd is not running"; return; }
    configure "drills-$$-c"
    if ! start_previewd; then fail "previewd does not start"; return; fi
    local code err leftovers st

    code=$(launch demo keep)
    if [ "$code" = 200 ] && serves keep; then pass "preview keep runs and answers 200 through nginx"; else fail "launch of keep: HTTP $code $(cat "$work/launch.txt")"; return; fi

    if ! make_readonly "$sites"; then fail "cannot make $sites read-only (neither a read-only bind mount nor chattr +i works here)"; return; fi
    if touch "$sites/.probe" 2>/dev/null; then rm -f "$sites/.probe"; fail "$sites is still writable"; make_writable; return; fi

    code=$(launch demo blocked)
    err=$(jq -r .error "$work/launch.txt" 2>/dev/null || cat "$work/launch.txt")
    if [[ "$code" =~ ^[45] ]] && grep -qF "$sites" <<<"$err" && grep -qiE 'read-only|not permitted' <<<"$err"; then
        pass "a launch fails with HTTP $code naming the path and the problem: $err"
    else
        fail "a launch into the read-only sites dir: HTTP $code: $err (expected a non-2xx naming $sites and the problem)"
    fi
    leftovers=$(find "$sites" -mindepth 1 -name '.*' -print)
    if [ -z "$leftovers" ]; then pass "no temp file left in the sites dir"; else fail "temp files left in the sites dir: $leftovers"; fi
    if [ ! -e "$(vhost blocked)" ]; then pass "no vhost for the failed launch"; else fail "a vhost for the failed launch exists: $(vhost blocked)"; fi
    st=$(containers blocked | awk '{ print $2 }' | tr '\n' ' ')
    if [ -z "$st" ]; then pass "no container left for the failed launch"; else fail "containers left for the failed launch: ${st% }"; fi
    if serves keep; then pass "nginx still serves the other preview (keep: 200)"; else fail "keep through nginx: $(through_nginx keep)"; fi
    code=$(healthz)
    note "/healthz while the sites dir is read-only: HTTP $code $(cat "$work/healthz.json")"

    make_writable
    code=$(launch demo blocked)
    if [ "$code" = 200 ] && serves blocked; then
        pass "once the sites dir is writable again, the launch works"
    else
        fail "launch after making the sites dir writable: HTTP $code $(cat "$work/launch.txt"), through nginx $(through_nginx blocked)"
    fi
    check_no_orphans
    check_nginx_config
}

# --- run ------------------------------------------------------------------------------------

run() { # drill function
    local before=$failures t
    t=$(now)
    # Checks are explicit, so a command that fails inside a drill must not end the script.
    "$1" || true
    if [ "$failures" = "$before" ]; then
        echo "PASS  $drill ($(since "$t") s)"
    else
        echo "FAIL  $drill ($(since "$t") s, $((failures - before)) failed)"
        show_log
        if grep 'address already in use' "$work/dockerd.log" | grep -vqE "127\.0\.0\.1:(${held_ports// /|}):"; then
            echo "      the second dockerd could not bind some host ports (address already in use): the main engine may hold many ports of the same range right now"
        fi
    fi
    if [ -n "$daemon" ]; then
        stop_previewd
        alive "$engine" && { containers | awk '{ print $1 }' | xargs -r docker -H "unix://$sock" rm -f >/dev/null; }
    fi
    return 0
}

started=$(now)
run drill_docker_restart
run drill_ports_taken
run drill_sites_readonly
drill=all
echo "drills: $checks checks, $failures failed, $(since "$started") s"
