#!/usr/bin/env bash
# Swarm drills: previewd with `runtime: {kind: swarm}` against a Swarm of three Docker engines
# of its own (a manager and two workers), run by scripts/test.sh after scripts/drills.sh against
# the release binary. Takes about two minutes.
#
# Each engine runs in a network namespace of its own (own socket, data root, exec root,
# containerd, bridge, a pre-created docker_gwbridge on a private range, no iptables changes;
# fuse-overlayfs storage: vfs gives a layer of an imported image a root directory of mode 700,
# which users other than root cannot enter),
# the namespaces joined by veths on one bridge (10.x.y.0/24) that the host's nginx reaches.
# The routing mesh needs IPVS, which this host does not have: previews publish in host mode
# and nginx proxies to the node that runs them. Images are copied to every node with
# `docker save | docker load` (there is no registry); the engines run with
# DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 so a node uses the image it has without a pull.
#
#   launch     a preview runs as a service on a worker (the constraint keeps it off the
#              manager), with previewd's labels on the service and its containers, and answers
#              through previewd's nginx, which proxies to the worker's address; the warm
#              networks are held on both workers; its log comes through the logs API
#   redeploy   a relaunch under load: no request fails, the new service serves, the old is gone
#   sleep      the preview sleeps (scaled to none) and the next request through nginx wakes it
#   drain      the worker running a preview is drained: the task moves, the route follows
#              within 30 s, and the preview answers again
#   node-down  every process of the worker engine running a preview is killed: Swarm
#              reschedules the task, the route follows within 30 s
#   restart    previewd is killed with SIGKILL and its vhosts deleted: a new previewd rebuilds
#              the routes from the services' labels alone
#   client     the CLI (list, pin, logs, doctor) and the dashboard against the Swarm
#   environment  the shop (app, PostgreSQL from a seed volume, Redis, a migration job) runs as
#              Swarm services on the manager, where its data lives; a product added before a
#              sleep is still there after the wake
#   build      an uploaded build context is built on the manager and its preview runs there
#   refused    a launch of an image no worker has fails at once with the worker's reason and
#              leaves no service
#   kill       killing every preview leaves no service, preview network or data volume, and
#              no holder but those of the warm networks (runtime.holder; launch checks them)
#
# Prints PASS/FAIL per check; exits 1 if any check failed, 2 if the drills could not run.
# Everything is removed on exit, also on Ctrl-C or a timeout.
#
# `scripts/swarm-drills.sh bench [N]` runs no drill: it times N launches on the Swarm (request
# to served through nginx) against the same by hand, alternately: `docker service create` in
# host mode on a labelled worker, wait until its task runs, one vhost for the node's address
# in an nginx of its own, `nginx -s reload`, poll until 200. Each of previewd's launches starts
# once its warm pool is full again, as between real launches. Prints both medians and the ratio.
# With SWARM_ISOLATION=false previews get no network of their own (network.isolation: false).
# Usage: scripts/swarm-drills.sh [bench [N]]   (env: SWARM_DRILLS_TIME_LIMIT seconds, default 300)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/drill-lib.sh
source scripts/drill-lib.sh

BIN=$PWD/target/release/previewd
IMAGE=previewd-demo:latest
# The shop environment (config.yml's `shop`): its app, PostgreSQL and Redis images and the
# seed volume are copied to the manager, where previews with services run.
SHOP_IMAGES=(previewd-shop:demo previewd-postgres:15 previewd-redis:7)
SEED=shop-db-seed
MODE=${1:-drills}
RUNS=${2:-10}
[ "$MODE" = drills ] || [ "$MODE" = bench ] || { echo "usage: $0 [bench [N]]" >&2; exit 2; }
LIMIT=${SWARM_DRILLS_TIME_LIMIT:-$([ "$MODE" = bench ] && echo $((120 + RUNS * 15)) || echo 300)}
FOLLOW=30 # seconds a moved preview may take to answer through nginx again
# bench: seconds the engines get to finish the previous launch's removals before each timed
# launch (previewd's and by hand alike), as between real launches
QUIET=${SWARM_BENCH_QUIET:-2}

log() { echo "swarm-drills: $*" >&2; }
die() { echo "swarm-drills: cannot run: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces, Docker engines, a bridge)"
for tool in dockerd docker nginx curl jq python3 ip iptables unshare mount fuse-overlayfs; do
    command -v "$tool" >/dev/null || die "$tool is not installed (scripts/setup.sh installs what previewd needs)"
done
[ -x "$BIN" ] || die "$BIN is missing: cargo build --release"
for image in "$IMAGE" "${SHOP_IMAGES[@]}"; do
    docker image inspect "$image" >/dev/null 2>&1 || die "$image is not on the main engine: run scripts/setup.sh"
done
docker volume inspect "$SEED" >/dev/null 2>&1 || die "the volume $SEED is not on the main engine: run scripts/setup.sh"

work=$(mktemp -d /tmp/previewd-swarm.XXXXXX)
tag=$(printf %04x $((RANDOM % 65536)))
bridge=pvsw$tag
nodes=(m w1 w2)
declare -A addr=() # node -> its address on the bridge
daemon=
watchdog=
load_pid=
forward_rule=
failures=0
checks=0
drill=setup


ns() { echo "pvsw$tag-$1"; }
sock() { echo "$work/$1/docker.sock"; }
D() { local node=$1; shift; docker -H "unix://$(sock "$node")" "$@"; }

kill_node() { # node: every process of the node's namespace (dockerd, containerd, shims, containers)
    ip netns pids "$(ns "$1")" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
}

cleanup() {
    local rc=$? node pid mnt file
    set +e
    trap - EXIT INT TERM
    [ -n "$watchdog" ] && kill "$watchdog" 2>/dev/null
    [ -n "$load_pid" ] && stop_process "$load_pid" 5
    [ -n "$daemon" ] && stop_process "$daemon" 15
    for file in "$work/state/nginx/nginx.pid" "$work/floor/nginx.pid"; do
        pid=$(cat "$file" 2>/dev/null) || continue
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q '^nginx: master'; then
            kill -QUIT "$pid"; wait_gone "$pid" 10 || kill -KILL "$pid"
        fi
    done
    for node in "${nodes[@]}"; do
        if [ -S "$(sock "$node")" ]; then
            D "$node" ps -aq 2>/dev/null | xargs -r docker -H "unix://$(sock "$node")" rm -f >/dev/null 2>&1
        fi
        pid=$(cat "$work/$node/docker.pid" 2>/dev/null)
        [ -n "$pid" ] && stop_process "$pid" 15
        kill_node "$node"
        ip netns del "$(ns "$node")" 2>/dev/null
        ip link del "pvsw$tag$node" 2>/dev/null
    done
    [ -n "$forward_rule" ] && iptables -D FORWARD -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null
    ip link del "$bridge" 2>/dev/null
    awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt"; done
    # Kept for a look after a failure (the work dir goes).
    [ -n "${state:-}" ] && cp "$state/previewd.log" /tmp/previewd-swarm-drills.log 2>/dev/null
    rm -rf "$work"
    if [ "$rc" = 0 ] && [ "$failures" -gt 0 ]; then rc=1; fi
    exit "$rc"
}
arm_watchdog "$LIMIT" swarm-drills


# --- the Swarm -----------------------------------------------------------------------------------

for _ in 1 2 3 4 5 6 7 8 9 10; do
    net=10.$((200 + RANDOM % 50)).$((RANDOM % 250))
    ip -4 route | grep -q "^$net\." || break
    net=
done
[ -n "$net" ] || die "no free /24 found for the Swarm's bridge"
ip link add "$bridge" type bridge || die "cannot create bridge $bridge"
ip addr add "$net.1/24" dev "$bridge"
ip link set "$bridge" up
# Bridged traffic goes through the host's FORWARD chain (br_netfilter), whose policy Docker set
# to DROP: let the nodes talk to each other (Swarm's control plane and VXLAN).
iptables -I FORWARD 1 -i "$bridge" -o "$bridge" -j ACCEPT && forward_rule=1

# One engine in its own network, mount and UTS namespaces. The cgroup hierarchies are mounted
# again in the engine's mount namespace: `ip netns exec` mounts a fresh /sys there.
start_node() { # node index
    local node=$1 i=$2 dir=$work/$1
    mkdir -p "$dir"
    addr[$node]=$net.1$i
    ip netns add "$(ns "$node")"
    ip link add "pvsw$tag$node" type veth peer name eth0 netns "$(ns "$node")"
    ip link set "pvsw$tag$node" master "$bridge" up
    ip -n "$(ns "$node")" addr add "${addr[$node]}/24" dev eth0
    ip -n "$(ns "$node")" link set eth0 up
    ip -n "$(ns "$node")" link set lo up
    ip -n "$(ns "$node")" route add default via "$net.1"
    echo '{}' >"$dir/daemon.json"
    # shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
    DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 ip netns exec "$(ns "$node")" unshare --uts sh -c '
        hostname "$1"
        mount -t tmpfs cgroup /sys/fs/cgroup
        for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
            mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
        done
        mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
        exec dockerd --config-file "$2/daemon.json" --host "unix://$2/docker.sock" --pidfile "$2/docker.pid" \
            --data-root "$2/data" --exec-root "$2/exec" --storage-driver fuse-overlayfs --bip "$3" \
            --iptables=false --ip-masq=false' sh "pvsw-$node" "$dir" "10.$((250 + i)).$((RANDOM % 250)).1/24" \
        >"$dir/dockerd.log" 2>&1 &
    disown # node-down kills it on purpose: no job report
    for ((j = 0; j < 300; j++)); do
        D "$node" version >/dev/null 2>&1 && break
        sleep 0.1
    done
    D "$node" version >/dev/null 2>&1 || { tail -n 20 "$dir/dockerd.log" >&2; return 1; }
    # Created before the engine joins, so that Swarm does not pick a range of its own.
    D "$node" network create --subnet "10.$((250 + i)).$((RANDOM % 250)).0/24" \
        --opt com.docker.network.bridge.name=docker_gwbridge --opt com.docker.network.bridge.enable_icc=false \
        --opt com.docker.network.bridge.enable_ip_masquerade=false docker_gwbridge >/dev/null
}

t=$(now)
i=0
for node in "${nodes[@]}"; do
    start_node "$node" "$i" || die "the engine of node $node did not come up (log above)"
    i=$((i + 1))
done
D m swarm init --listen-addr "${addr[m]}:2377" --advertise-addr "${addr[m]}" \
    --default-addr-pool "10.$((200 + RANDOM % 50)).0.0/16" >/dev/null ||
    die "swarm init failed"
token=$(D m swarm join-token -q worker)
for node in w1 w2; do
    D "$node" swarm join --token "$token" --listen-addr "${addr[$node]}:2377" --advertise-addr "${addr[$node]}" \
        "${addr[m]}:2377" >/dev/null || die "node $node could not join the Swarm"
    D m node update --label-add previews=true "pvsw-$node" >/dev/null || die "cannot label node $node"
done
docker save "$IMAGE" -o "$work/image.tar"
for node in "${nodes[@]}"; do D "$node" load -q -i "$work/image.tar" >/dev/null || die "cannot load $IMAGE on $node"; done
# An image the manager has and the workers do not: their engines refuse its tasks.
ELSEWHERE=previewd-demo:manager-only
D m tag "$IMAGE" "$ELSEWHERE" || die "cannot tag $ELSEWHERE on the manager"
docker save "${SHOP_IMAGES[@]}" | D m load -q >/dev/null || die "cannot load the shop's images on the manager"
# The seed volume, owners and modes kept (tar as root, in the busybox of the demo image).
D m volume create "$SEED" >/dev/null
docker run --rm --network none -v "$SEED:/seed:ro" "$IMAGE" /bin/busybox tar -C /seed -cf - . |
    D m run --rm -i --network none -v "$SEED:/seed" "$IMAGE" /bin/busybox tar -C /seed -xf - ||
    die "cannot copy the volume $SEED to the manager"
log "Swarm of ${#nodes[@]} engines (manager ${addr[m]}, workers ${addr[w1]} ${addr[w2]}) up with $IMAGE in $(since "$t") s"

# --- previewd ------------------------------------------------------------------------------------

hash=$(printf %s drill | "$BIN" hash-password)
instance=swarm-$$
state=$work/state
sites=$state/nginx/sites
api_port=$(free_port)
nginx_port=$(free_port)
mkdir -p "$state"
cat >"$state/config.yml" <<EOF
instance: $instance
listen: 127.0.0.1:$api_port
base_domain: preview.localhost
public_url: "http://{host}:$nginx_port"
state_dir: $state
runtime:
  kind: swarm
  constraints: ["node.labels.previews == true"]
  upstream: node_addr
  holder: {image: $IMAGE, command: [/bin/busybox, sleep, "2147483647"]}
nginx:
  listen: 127.0.0.1:$nginx_port
  template: $PWD/templates/vhost.conf.tera
network: {warm: 2, isolation: ${SWARM_ISOLATION:-true}}
images:
  demo: {image: $IMAGE, port: 3000, command: [/bin/busybox, httpd, -f, -vv, -p, "3000", -h, /www], pull: never}
  elsewhere: {image: $ELSEWHERE, port: 3000, command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www], pull: never}
  shop:
    image: previewd-shop:demo
    port: 5000
    health_path: /healthz
    pull: never
    read_only: true
    env: {DATABASE_URL: "postgres://app:app@db:5432/app", REDIS_URL: "redis://cache:6379/0"}
    services:
      db:
        image: previewd-postgres:15
        pull: never
        env: {POSTGRES_USER: app, POSTGRES_PASSWORD: app, POSTGRES_DB: app}
        ready: {command: [pg_isready, -h, 127.0.0.1, -U, app, -d, app]}
        ready_timeout: 60
        data: /var/lib/postgresql/data
        seed_volume: $SEED
        cap_add: [SETUID, SETGID]
        memory: 512m
      cache:
        image: previewd-redis:7
        pull: never
        ready: {tcp: 6379}
    jobs:
      - {name: migrate, command: [python3, migrate.py], when: every_deploy, timeout: 120}
users: [{name: drill, password_hash: "$hash"}]
EOF
# SWARM_ISOLATION=false (for `bench`): previews on the nodes' default bridge, no network of
# their own; the shop, whose services need one, goes.
[ "${SWARM_ISOLATION:-true}" = true ] || sed -i '/^  shop:/,/^users:/{/^users:/!d}' "$state/config.yml"

healthz() { curl -s -m 5 -o "$work/healthz.json" -w '%{http_code}' "http://127.0.0.1:$api_port/healthz" || true; }

start_previewd() {
    DOCKER_HOST="unix://$(sock m)" RUST_LOG=${RUST_LOG:-info} "$BIN" serve --config "$state/config.yml" 2>>"$state/previewd.log" &
    daemon=$!
    local i
    for ((i = 0; i < 300; i++)); do
        [ "$(healthz)" = 200 ] && return 0
        alive "$daemon" || break
        sleep 0.1
    done
    log "previewd did not become healthy; its log ends with:"
    tail -n 20 "$state/previewd.log" >&2
    return 1
}

api() { # method path: the body goes to $work/api.json, prints the status
    curl -s -m 60 -o "$work/api.json" -w '%{http_code}' -u drill:drill -X "$1" "http://127.0.0.1:$api_port$2" || true
}

launch() { # name [image]: prints the HTTP status, the body goes to $work/launch.txt
    curl -s -m 120 -o "$work/launch.txt" -w '%{http_code}' -u drill:drill \
        -d "image_name=${2:-demo}&container_name=$1" "http://127.0.0.1:$api_port/launch" || true
}

shop_state() { # name: /api/state of the shop through nginx, as "products migrated visits"
    curl -s -m 10 --resolve "$1.preview.localhost:$nginx_port:127.0.0.1" "http://$1.preview.localhost:$nginx_port/api/state" |
        jq -r '"\(.products) \(.migrated) \(.visits)"' 2>/dev/null || true
}

through_nginx() { # name
    curl -s -m 3 -o "$work/page.html" -w '%{http_code}' --resolve "$1.preview.localhost:$nginx_port:127.0.0.1" \
        "http://$1.preview.localhost:$nginx_port/" || true
}

serves() { [ "$(through_nginx "$1")" = 200 ] && grep -q "<h1>Preview: $1</h1>" "$work/page.html"; }

vhost() { echo "$sites/previewd.$instance.$1.conf"; }
upstream() { sed -n 's/.*proxy_pass http:\/\/\([0-9.]*:[0-9]*\);.*/\1/p' "$(vhost "$1")" 2>/dev/null | head -n 1; }

services() { # [name]: ids of the instance's services (of one preview)
    local filters=(--filter "label=previewd.instance=$instance" --filter label=previewd.managed=true)
    [ $# = 1 ] && filters+=(--filter "label=previewd.slug=$1")
    D m service ls -q "${filters[@]}"
}

node_of() { # name: the node whose task of the preview runs
    local id
    id=$(services "$1" | tail -n 1)
    [ -n "$id" ] || return 0
    D m service ps "$id" --filter desired-state=running --format '{{.Node}} {{.CurrentState}}' |
        awk '$2 == "Running" { sub(/^pvsw-/, "", $1); print $1; exit }'
}

# The preview answers through nginx, proxied to the node that runs its task, within $FOLLOW s.
published_port() { # name: the port the preview's service publishes
    D m service inspect "$(services "$1" | tail -n 1)" --format '{{ (index .Spec.EndpointSpec.Ports 0).PublishedPort }}'
}

follows() { # name t0
    local name=$1 t0=$2 node port
    port=$(published_port "$name")
    while awk -v a="$t0" -v b="$(now)" -v l="$FOLLOW" 'BEGIN { exit !(b - a < l) }'; do
        node=$(node_of "$name")
        if [ -n "$node" ] && [ "$(upstream "$name")" = "${addr[$node]}:$port" ] && serves "$name"; then
            pass "$name answers through nginx again, routed to its task on $node (${addr[$node]}), $(since "$t0") s later"
            return 0
        fi
        sleep 0.2
    done
    fail "$name does not answer through nginx from its new node within $FOLLOW s: node ${node:-none}, vhost upstream $(upstream "$name"), through nginx $(through_nginx "$name")"
    note "its tasks: $(D m service ps "$(services "$name" | tail -n 1)" --format '{{.Node}} {{.DesiredState}} {{.CurrentState}} {{.Error}}' | tr '\n' ';')"
    note "nodes: $(D m node ls --format '{{.Hostname}} {{.Status}} {{.Availability}}' | tr '\n' ';')"
    show_log
}

show_log() {
    local lines
    lines=$(sed 's/\x1b\[[0-9;]*m//g' "$state/previewd.log" | grep -E 'WARN|ERROR' | tail -n 20 || true)
    [ -n "$lines" ] && { echo "      previewd's warnings and errors:"; printf '        %s\n' "${lines//$'\n'/$'\n'        }"; }
    return 0
}

# --- the drills ----------------------------------------------------------------------------------

drill_launch() {
    drill=launch
    local code id node labels upstream_port
    code=$(launch alpha)
    if [ "$code" != 200 ] || ! serves alpha; then
        fail "launch of alpha: HTTP $code ($(cat "$work/launch.txt")), through nginx $(through_nginx alpha)"; show_log; return 1
    fi
    id=$(services alpha)
    node=$(node_of alpha)
    upstream_port=$(upstream alpha)
    pass "alpha runs as service ${id:0:12} on $node and answers 200 through previewd's nginx"
    case $node in
        w1 | w2) pass "the constraint node.labels.previews == true kept it off the manager" ;;
        *) fail "alpha runs on ${node:-no node}, not on a worker labelled previews=true" ;;
    esac
    local network
    network=$(D m network inspect -f '{{.Name}} {{.Driver}}' "$(D m service inspect "$id" --format '{{ range .Spec.TaskTemplate.Networks }}{{ .Target }}{{ end }}')")
    if [ "$network" = "$(D m service inspect "$id" --format '{{ index .Spec.Labels "previewd.network" }}') overlay" ]; then
        pass "alpha is on an overlay network of its own (${network% *})"
    else
        fail "alpha's network: '$network'"
    fi
    if [ "$upstream_port" = "${addr[$node]}:$(published_port alpha)" ]; then
        pass "nginx proxies to the worker's address and the published port ($upstream_port)"
    else
        fail "the vhost proxies to $upstream_port, not to ${addr[$node]}"
    fi
    labels=$(D m service inspect "$id" --format '{{ index .Spec.Labels "previewd.slug" }} {{ index .Spec.TaskTemplate.ContainerSpec.Labels "previewd.instance" }} {{ (index .Spec.EndpointSpec.Ports 0).PublishMode }} {{ .Spec.UpdateConfig.Order }}')
    if [ "$labels" = "alpha $instance host stop-first" ]; then
        pass "the service and its containers carry previewd's labels; published in host mode; stop-first updates"
    else
        fail "service labels/publish mode/update order: $labels"
    fi
    drill_holders "${network% *}"
    code=$(curl -s -m 10 -o "$work/logs.txt" -w '%{http_code}' -u drill:drill "http://127.0.0.1:$api_port/api/previews/alpha/logs?tail=20" || true)
    if [ "$code" = 200 ] && grep -q 'url:/' "$work/logs.txt"; then
        pass "GET /api/previews/alpha/logs gives the task's output from its worker ($(grep -c 'url:/' "$work/logs.txt") request lines)"
    else
        fail "logs of alpha: HTTP $code: $(head -c 300 "$work/logs.txt")"
    fi
}

holders() { # the instance's holder services, as "network replicas" lines
    D m service ls --filter "label=previewd.instance=$instance" --filter label=previewd.holds --format '{{.ID}} {{.Replicas}}' |
        while read -r id replicas; do
            echo "$(D m service inspect "$id" --format '{{ index .Spec.Labels "previewd.holds" }}') $replicas"
        done
}

# The warm pool's networks are held on both workers (runtime.holder), and the one a launch
# took is held no more once its preview runs.
drill_holders() { # network alpha took
    local taken=$1 i lines=
    for ((i = 0; i < 300; i++)); do
        lines=$(holders)
        [ "$(grep -c ' 2/2$' <<<"$lines")" = 2 ] && ! grep -q "^$taken " <<<"$lines" && break
        sleep 0.1
    done
    if [ "$(grep -c ' 2/2$' <<<"$lines")" = 2 ]; then
        pass "both warm networks are held on both workers ($(cut -d' ' -f1 <<<"$lines" | tr '\n' ' '))"
    else
        fail "holders of the warm networks: '$(tr '\n' ';' <<<"$lines")'"
    fi
    if [ -n "$lines" ] && ! grep -q "^$taken " <<<"$lines"; then
        pass "the network alpha took is held by alpha alone"
    else
        fail "the network alpha took ($taken) still has a holder"
    fi
}

drill_redeploy() {
    drill=redeploy
    local code old new failed total
    old=$(services alpha)
    python3 - "$nginx_port" >"$work/load.out" 2>&1 <<'EOF' &
import http.client, sys, time
port = int(sys.argv[1])
ok = failed = 0
deadline = time.time() + 60
while time.time() < deadline:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        conn.request("GET", "/", headers={"Host": "alpha.preview.localhost"})
        status = conn.getresponse().status
        conn.close()
    except OSError:
        status = 0
    if status == 200:
        ok += 1
    else:
        failed += 1
    print(ok, failed, flush=True)
    time.sleep(0.02)
EOF
    load_pid=$!
    sleep 1
    code=$(launch alpha)
    sleep 1
    stop_process "$load_pid" 5
    load_pid=
    read -r total failed < <(tail -n 1 "$work/load.out")
    new=$(services alpha)
    if [ "$code" = 200 ] && serves alpha && [ -n "$new" ] && [ "$new" != "$old" ]; then
        pass "the relaunch replaced service ${old:0:12} with ${new:0:12}, which serves"
    else
        fail "relaunch: HTTP $code ($(cat "$work/launch.txt")), services now: $(services alpha | tr '\n' ' ')"
    fi
    if [ "${failed:-1}" = 0 ] && [ "${total:-0}" -gt 20 ]; then
        pass "no failed request during the redeploy ($total answered 200)"
    else
        fail "requests during the redeploy: ${total:-0} ok, ${failed:-?} failed"
    fi
}

drill_sleep() {
    drill="sleep"
    local code replicas t0
    code=$(api POST /api/previews/alpha/sleep)
    replicas=$(D m service inspect "$(services alpha)" --format '{{ .Spec.Mode.Replicated.Replicas }}')
    if [ "$code" = 200 ] && [ "$replicas" = 0 ]; then
        pass "alpha sleeps: its service is scaled to 0 replicas"
    else
        fail "sleep: HTTP $code $(cat "$work/api.json"), replicas $replicas"
    fi
    t0=$(now)
    if serves alpha || serves alpha; then
        pass "a request through nginx woke alpha and got its page ($(since "$t0") s)"
    else
        fail "the request to the sleeping alpha got $(through_nginx alpha)"; show_log
    fi
}

drill_drain() {
    drill=drain
    local from t0
    from=$(node_of alpha)
    [ -n "$from" ] || { fail "alpha has no running task"; return; }
    t0=$(now)
    D m node update --availability drain "pvsw-$from" >/dev/null || fail "cannot drain pvsw-$from"
    follows alpha "$t0"
    D m node update --availability active "pvsw-$from" >/dev/null
}

drill_node_down() {
    drill="node-down"
    local from t0
    from=$(node_of alpha)
    [ -n "$from" ] || { fail "alpha has no running task"; return; }
    t0=$(now)
    kill_node "$from"
    note "killed every process of $from's engine (dockerd, containerd, the preview's container)"
    follows alpha "$t0"
}

drill_restart() {
    drill=restart
    local code
    code=$(launch beta)
    [ "$code" = 200 ] || { fail "launch of beta: HTTP $code $(cat "$work/launch.txt")"; show_log; return; }
    kill -KILL "$daemon"; wait "$daemon" 2>/dev/null || true; daemon=
    rm -f "$sites"/previewd."$instance".*.conf
    if ! start_previewd; then fail "previewd does not start again"; return; fi
    if serves alpha && serves beta; then
        pass "after kill -9 and the loss of every vhost, a new previewd routes alpha and beta again from the services' labels"
    else
        fail "after the restart: alpha $(through_nginx alpha), beta $(through_nginx beta)"; show_log
    fi
    code=$(api GET /api/previews)
    if [ "$code" = 200 ] && [ "$(jq -r '[.[] | .name] | sort | join(" ")' "$work/api.json")" = "alpha beta" ]; then
        pass "GET /api/previews lists alpha and beta"
    else
        fail "GET /api/previews: HTTP $code $(cat "$work/api.json")"
    fi
}

drill_environment() {
    drill=environment
    local code state t0 node parts
    t0=$(now)
    code=$(launch store shop)
    if [ "$code" != 200 ]; then fail "launch of the shop: HTTP $code $(cat "$work/launch.txt")"; show_log; return; fi
    state=$(shop_state store)
    if [ "${state% *}" = "10000 true" ]; then
        pass "the shop runs with PostgreSQL (seeded: 10000 products), Redis and its migration, in $(since "$t0") s"
    else
        fail "the shop's state through nginx: '$state'"; show_log
    fi
    parts=$(for id in $(services store); do D m service inspect "$id" --format '{{ index .Spec.Labels "previewd.role" }}:{{ index .Spec.Labels "previewd.part" }}'; done | sort | tr '\n' ' ')
    node=$(node_of store)
    if [ "$parts" = "app: service:cache service:db " ] && [ "$node" = m ]; then
        pass "app, db and cache are Swarm services, placed together on the manager (their data lives there)"
    else
        fail "the shop's services: '$parts' on ${node:-no node}"
    fi
    curl -s -m 10 -o /dev/null --resolve "store.preview.localhost:$nginx_port:127.0.0.1" \
        -d 'name=swarm&price=1.50' "http://store.preview.localhost:$nginx_port/products" || true
    code=$(api POST /api/previews/store/sleep)
    state=$(shop_state store)
    if [ "$code" = 200 ] && [ "${state%% *}" = 10001 ]; then
        pass "after a sleep (every service scaled to none) and a wake, the database still holds the product added before"
    else
        fail "sleep: HTTP $code; the shop's state after the wake: '$state'"; show_log
    fi
}

drill_build() {
    drill=build
    local code ctx=$work/context
    mkdir -p "$ctx"
    printf 'FROM %s\nCOPY index.html /www/index.html\n' "$IMAGE" >"$ctx/Dockerfile"
    echo '<h1>Built on the Swarm</h1>' >"$ctx/index.html"
    code=$(tar -C "$ctx" -cf - . | curl -s -m 120 -o "$work/build.txt" -w '%{http_code}' -u drill:drill \
        -H 'Content-Type: application/x-tar' --data-binary @- \
        "http://127.0.0.1:$api_port/api/builds?image=demo&name=built" || true)
    if [ "$code" = 200 ] && [ "$(through_nginx built)" = 200 ] && grep -q 'Built on the Swarm' "$work/page.html"; then
        pass "an uploaded context was built and its preview serves the built page through nginx"
    else
        fail "build: HTTP $code $(cat "$work/build.txt"), through nginx $(through_nginx built)"; show_log; return
    fi
    if [ "$(node_of built)" = m ]; then
        pass "the built image's preview runs on the manager, the one node that has the image"
    else
        fail "the built preview runs on $(node_of built), which does not have the image"
    fi
}

# The CLI and the dashboard against the Swarm: the same API, read from the services' labels.
drill_client() {
    drill=client
    local out code
    cli() { PREVIEWD_SERVER="http://127.0.0.1:$api_port" PREVIEWD_USER=drill PREVIEWD_PASSWORD=drill "$BIN" "$@"; }
    if out=$(cli list 2>&1) && grep -q '^alpha ' <<<"$out" && grep -q '^beta ' <<<"$out"; then
        pass "previewd list shows alpha and beta"
    else
        fail "previewd list: $out"
    fi
    code=$(api GET /api/previews/beta)
    if cli pin beta >/dev/null 2>&1 && [ "$(api GET /api/previews/beta)" = 200 ] && [ "$(jq -r .pinned "$work/api.json")" = user:drill ]; then
        pass "previewd pin beta: the API then says it is pinned by user:drill"
    else
        fail "previewd pin beta: before HTTP $code, then $(cat "$work/api.json")"
    fi
    cli unpin beta >/dev/null 2>&1 || fail "previewd unpin beta failed"
    if out=$(cli logs alpha --tail 5 2>&1) && grep -q 'url:/' <<<"$out"; then
        pass "previewd logs alpha prints the app's output from its worker"
    else
        fail "previewd logs alpha: $out"
    fi
    out=$(DOCKER_HOST="unix://$(sock m)" "$BIN" doctor --config "$state/config.yml" 2>&1 || true)
    if grep -qE '^ok +swarm +a Swarm manager; 2 of 3 nodes ready and active' <<<"$out" &&
        grep -qE '^ok +firewall +on a Swarm' <<<"$out"; then
        pass "previewd doctor sees the Swarm manager, 2 of 3 nodes usable (one is down), and no firewall of its own"
    else
        fail "previewd doctor: $(grep -E 'swarm|firewall' <<<"$out" | tr '\n' ';')"
    fi
    code=$(curl -s -m 10 -o "$work/dashboard.html" -w '%{http_code}' -u drill:drill -H 'Accept: text/html' "http://127.0.0.1:$api_port/" || true)
    if [ "$code" = 200 ] && grep -q 'alpha' "$work/dashboard.html" && grep -q 'beta' "$work/dashboard.html"; then
        pass "the dashboard lists alpha and beta"
    else
        fail "dashboard: HTTP $code"
    fi
}

# An image the workers do not have: the launch fails at once with the worker's reason, and
# leaves no service behind.
drill_refused() {
    drill=refused
    local t0 code i
    t0=$(now)
    code=$(launch stray elsewhere)
    if [ "$code" = 422 ] && grep -q "refused to run the preview: .*$ELSEWHERE" "$work/launch.txt"; then
        pass "a launch of an image no worker has failed in $(since "$t0") s with HTTP $code: $(head -c 160 "$work/launch.txt" | tr '\n' ' ')"
    else
        fail "launch of an image no worker has: HTTP $code after $(since "$t0") s: $(head -c 300 "$work/launch.txt")"
    fi
    for ((i = 0; i < 100; i++)); do [ -z "$(services stray)" ] && break; sleep 0.1; done
    if [ -z "$(services stray)" ]; then pass "the refused launch left no service"; else fail "services left by the refused launch: $(services stray)"; fi
}

drill_kill() {
    drill="kill"
    local name code networks volumes
    networks=$(for id in $(services); do D m service inspect "$id" --format '{{ index .Spec.Labels "previewd.network" }}'; done | sort -u)
    volumes=$(D m volume ls -q --filter "label=previewd.instance=$instance" | tr '\n' ' ')
    for name in alpha beta store built; do
        code=$(curl -s -m 60 -o "$work/kill.txt" -w '%{http_code}' -u drill:drill -d "container_name=$name" "http://127.0.0.1:$api_port/kill" || true)
        [ "$code" = 200 ] || fail "kill of $name: HTTP $code $(cat "$work/kill.txt")"
    done
    if [ -z "$(services)" ]; then pass "no service of the instance is left"; else fail "services left: $(services | tr '\n' ' ')"; fi
    local held stray=
    held=$(holders | cut -d' ' -f1)
    for network in $held; do
        if ! D m network inspect "$network" >/dev/null 2>&1 || grep -qx "$network" <<<"$networks"; then stray="$stray $network"; fi
    done
    if [ -n "$held" ] && [ -z "$stray" ]; then
        pass "the only holders left are those of the warm networks ($(tr '\n' ' ' <<<"$held"))"
    else
        fail "holders: '$(tr '\n' ' ' <<<"$held")', of removed or taken networks: '$stray'"
    fi
    local left=
    for network in $networks; do D m network inspect "$network" >/dev/null 2>&1 && left="$left $network"; done
    if [ -n "$networks" ] && [ -z "$left" ]; then
        pass "the previews' overlay networks are gone ($(tr "\n" " " <<<"$networks"))"
    else
        fail "preview networks: had '$networks', left '$left'"
    fi
    if [ -z "$(ls "$sites"/previewd."$instance".*.conf 2>/dev/null)" ]; then pass "no vhost is left"; else fail "vhosts left: $(ls "$sites")"; fi
    if [ -n "$volumes" ] && [ -z "$(D m volume ls -q --filter "label=previewd.instance=$instance")" ]; then
        pass "the shop's data volume is gone ($volumes)"
    else
        fail "data volumes: had '$volumes', left '$(D m volume ls -q --filter "label=previewd.instance=$instance" | tr '\n' ' ')'"
    fi
    if [ -z "$(D m images -q --filter label=previewd.built=true)" ]; then
        pass "the built image is gone from the manager"
    else
        fail "built images left on the manager: $(D m images --filter label=previewd.built=true --format '{{.Repository}}:{{.Tag}}' | tr '\n' ' ')"
    fi
}

# --- bench -------------------------------------------------------------------------------------

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# The floor's nginx: one server block per preview, as a person would write it.
start_floor() {
    floor=$work/floor
    floor_port=$(free_port)
    mkdir -p "$floor/sites" "$floor/tmp"
    cat >"$floor/nginx.conf" <<EOF
pid $floor/nginx.pid;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $floor/tmp/b; proxy_temp_path $floor/tmp/p; fastcgi_temp_path $floor/tmp/f;
  uwsgi_temp_path $floor/tmp/u; scgi_temp_path $floor/tmp/s;
  server { listen 127.0.0.1:$floor_port default_server; return 404; }
  include $floor/sites/*.conf;
}
EOF
    floor_nginx
}
floor_nginx() { nginx -p "$floor" -c "$floor/nginx.conf" -e "$floor/error.log" "$@"; }

# By hand: the service, its task running, the vhost to the node's address, a reload, until 200.
hand_launch() { # name port
    local name=$1 port=$2 node
    D m service create -d -q --no-resolve-image --name "$name" --constraint node.labels.previews==true \
        --publish "mode=host,published=$port,target=3000" --update-order stop-first \
        "$IMAGE" /bin/busybox httpd -f -p 3000 -h /www >/dev/null
    until node=$(D m service ps "$name" --filter desired-state=running --format '{{.Node}} {{.CurrentState}}' |
        awk '$2 == "Running" { sub(/^pvsw-/, "", $1); print $1; exit }') && [ -n "$node" ]; do
        sleep 0.01
    done
    echo "server { listen 127.0.0.1:$floor_port; server_name $name.floor.localhost; location / { proxy_pass http://${addr[$node]}:$port; } }" \
        >"$floor/sites/$name.conf"
    floor_nginx -s reload
    until [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' -H "Host: $name.floor.localhost" "http://127.0.0.1:$floor_port/")" = 200 ]; do
        sleep 0.01
    done
}

bench() {
    drill=bench
    local i t0 code ours=() hands=()
    start_floor
    for ((i = 1; i <= RUNS; i++)); do
        sleep "$QUIET"
        until curl -s "http://127.0.0.1:$api_port/metrics" | grep -qE '^previewd_warm_networks ('"$([ "${SWARM_ISOLATION:-true}" = true ] && echo 2 || echo 0)"')$'; do sleep 0.1; done
        t0=$(now)
        code=$(launch "bench-$i")
        if [ "$code" != 200 ] || ! serves "bench-$i"; then
            fail "launch of bench-$i: HTTP $code $(cat "$work/launch.txt")"; show_log; return
        fi
        ours+=("$(since "$t0" 3)")
        curl -s -m 60 -o /dev/null -u drill:drill -d "container_name=bench-$i" "http://127.0.0.1:$api_port/kill"
        sleep "$QUIET"
        t0=$(now)
        hand_launch "hand-$i" $((31000 + i))
        hands+=("$(since "$t0" 3)")
        D m service rm "hand-$i" >/dev/null
        rm -f "$floor/sites/hand-$i.conf"
        echo "      run $i: previewd ${ours[-1]} s, by hand ${hands[-1]} s"
    done
    local a b
    a=$(printf '%s\n' "${ours[@]}" | median)
    b=$(printf '%s\n' "${hands[@]}" | median)
    echo "launch on the Swarm, median of $RUNS (request to first 200 through nginx): previewd $a s, by hand $b s, $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a / b }')x"
}

start_previewd || die "previewd does not start against the Swarm"
if [ "$MODE" = bench ]; then
    bench
    exit
fi
drill_launch && {
    drill_redeploy
    drill_sleep
    drill_drain
    drill_node_down
    drill_restart
    drill_client
    drill_environment
    drill_build
    drill_refused
    drill_kill
}
echo "swarm-drills: $checks checks, $failures failed"
