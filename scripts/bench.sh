#!/usr/bin/env bash
# Measures previewd side by side with the floor (the same work by hand: docker run, one vhost,
# nginx -s reload, poll until 200) and writes BENCHMARKS.md. Not part of the tests: it takes
# minutes and wants a quiet machine. Usage: scripts/bench.sh [RUNS]   (default 10)
#   1. launch latency: POST /launch until the first 200 through nginx, vs the floor
#   2. burst: 50 launches at once, wall time and nginx reloads, vs the floor doing 50 in parallel
#   3. redeploy: 20 redeploys under wrk load through nginx, failed requests
#   4. footprint: previewd's RSS idle, after the burst, and its peak
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${1:-10}
BURST=50
REDEPLOYS=20
IMAGE=previewd-demo:latest

log() { echo "bench: $*" >&2; }
command -v wrk >/dev/null || { log "installing wrk"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
PREVIEWD_SKIP_BUILD=1 bash scripts/setup.sh
[ -x target/release/previewd ] || cargo build --release

work=$(mktemp -d)
instance="bench$RANDOM"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || shuf -i 20000-60000 -n 1; }
nginx_port=$(free_port); api_port=$(free_port); floor_port=$(free_port)
hash=$(printf %s bench | target/release/previewd hash-password)
cat >"$work/config.yml" <<EOF
instance: $instance
listen: 127.0.0.1:$api_port
base_domain: preview.localhost
public_url: "http://{host}:$nginx_port"
state_dir: $work/state
nginx:
  listen: 127.0.0.1:$nginx_port
  template: $PWD/templates/vhost.conf.tera
images:
  demo: {image: $IMAGE, port: 3000, command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www], pull: never}
users: [{name: bench, password_hash: "$hash"}]
EOF

# The floor's own nginx, configured like previewd's managed one.
mkdir -p "$work/floor/sites" "$work/floor/tmp"
cat >"$work/floor/nginx.conf" <<EOF
pid $work/floor/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/floor/tmp/b; proxy_temp_path $work/floor/tmp/p;
  fastcgi_temp_path $work/floor/tmp/f; uwsgi_temp_path $work/floor/tmp/u; scgi_temp_path $work/floor/tmp/s;
  server_names_hash_bucket_size 256;
  server { listen 127.0.0.1:$floor_port default_server; return 404; }
  include $work/floor/sites/*.conf;
}
EOF
floor_nginx() { nginx -p "$work/floor" -c "$work/floor/nginx.conf" -e "$work/floor/error.log" "$@"; }

cleanup() {
    [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
    for filter in "label=previewd.instance=$instance" "label=bench.floor=$instance"; do
        docker ps -aq --filter "$filter" | xargs -r docker rm -f >/dev/null 2>&1 || true
    done
    [ -f "$work/state/nginx/nginx.pid" ] && kill -QUIT "$(cat "$work/state/nginx/nginx.pid")" 2>/dev/null || true
    [ -f "$work/floor/nginx.pid" ] && kill -QUIT "$(cat "$work/floor/nginx.pid")" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { print b - a }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
wait_200() { # host port
    until [ "$(curl -s -o /dev/null -w '%{http_code}' --resolve "$1:$2:127.0.0.1" "http://$1:$2/")" = 200 ]; do sleep 0.01; done
}
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$daemon/status"; }
hwm_kb() { awk '/^VmHWM/ { print $2 }' "/proc/$daemon/status"; }
reloads() { curl -s "http://127.0.0.1:$api_port/healthz" | sed -n 's/.*"nginx_reloads":\([0-9]*\).*/\1/p'; }

floor_nginx
target/release/previewd serve --config "$work/config.yml" 2>"$work/previewd.log" &
daemon=$!
until curl -sf "http://127.0.0.1:$api_port/healthz" >/dev/null; do sleep 0.1; done
sleep 1
rss_idle=$(rss_kb)

launch() { curl -sf -u bench:bench -d "image_name=demo&container_name=$1" "http://127.0.0.1:$api_port/launch" >/dev/null; }
floor_launch() { # name
    local id port
    id=$(docker run -d --label "bench.floor=$instance" -p 127.0.0.1::3000 "$IMAGE" /bin/busybox httpd -f -p 3000 -h /www)
    port=$(docker port "$id" 3000/tcp | head -1 | cut -d: -f2)
    printf 'server { listen 127.0.0.1:%s; server_name %s.floor.localhost; location / { proxy_pass http://127.0.0.1:%s; } }\n' \
        "$floor_port" "$1" "$port" >"$work/floor/sites/$1.conf"
    floor_nginx -s reload
    wait_200 "$1.floor.localhost" "$floor_port"
}

log "1. launch latency, $RUNS runs each"
: >"$work/p.txt"; : >"$work/f.txt"
for i in $(seq "$RUNS"); do
    t=$(now); launch "lat-$i"; wait_200 "lat-$i.preview.localhost" "$nginx_port"; since "$t" >>"$work/p.txt"
    t=$(now); floor_launch "lat-$i"; since "$t" >>"$work/f.txt"
done
p_lat=$(median <"$work/p.txt"); f_lat=$(median <"$work/f.txt")

log "2. burst of $BURST launches"
before=$(reloads)
t=$(now)
seq "$BURST" | xargs -P "$BURST" -I{} curl -sf -o /dev/null -u bench:bench -d "image_name=demo&container_name=burst-{}" "http://127.0.0.1:$api_port/launch"
for i in $(seq "$BURST"); do wait_200 "burst-$i.preview.localhost" "$nginx_port"; done
p_burst=$(since "$t")
burst_reloads=$(( $(reloads) - before ))
export -f floor_launch floor_nginx wait_200; export work instance floor_port IMAGE
t=$(now)
seq "$BURST" | xargs -P "$BURST" -I{} bash -c 'floor_launch burst-{}' 2>/dev/null || true
f_burst=$(since "$t")
rss_burst=$(rss_kb); rss_peak=$(hwm_kb)

log "3. $REDEPLOYS redeploys under load, and the same load without them"
launch steady
load() { # seconds output: wrk against the steady preview
    wrk -t 2 -c 4 -d "${1}s" -H "Host: steady.preview.localhost" "http://127.0.0.1:$nginx_port/" >"$2" 2>&1
}
failures() { # wrk output -> "non-2xx socket-errors requests rate"
    awk '/requests in/ { n = $1 } /Non-2xx/ { bad = $NF } /Socket errors/ { gsub(",", ""); sock = $4 + $6 + $8 + $10 }
         /Requests\/sec/ { rate = $2 } END { print bad + 0, sock + 0, n + 0, rate + 0 }' "$1"
}
t=$(now)
load 600 "$work/wrk.txt" &
wrk_pid=$!
sleep 1
for i in $(seq "$REDEPLOYS"); do launch steady; done
sleep 1
pkill -INT -P "$wrk_pid" wrk 2>/dev/null || kill -INT "$wrk_pid"; wait "$wrk_pid" || true
seconds=$(since "$t" | awk '{ printf "%d", $1 + 0.5 }')
read -r bad socket_errors requests rate < <(failures "$work/wrk.txt")
load "$seconds" "$work/baseline.txt"
read -r base_bad base_socket base_requests base_rate < <(failures "$work/baseline.txt")

cpu=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
cat >BENCHMARKS.md <<EOF
# Benchmarks

Measured by \`scripts/bench.sh $RUNS\` on $(date -u +%Y-%m-%d): $(nproc) cores ($cpu), $(free -g | awk '/Mem:/ { print $2 }') GiB,
Docker $(docker version --format '{{.Server.Version}}'), $(nginx -v 2>&1 | sed 's/.*: //'), previewd $(git rev-parse --short HEAD) (release build).
The floor is the same work done by hand in the same run: \`docker run -d -p 127.0.0.1::3000\`, one vhost,
\`nginx -s reload\`, poll until the URL answers 200. This machine is shared and noisy: compare the
ratios, not the absolute times.

| figure | previewd | floor | ratio | target |
| --- | --- | --- | --- | --- |
| launch latency, median of $RUNS (request to first 200 through nginx) | $(printf %.3f "$p_lat") s | $(printf %.3f "$f_lat") s | $(ratio "$p_lat" "$f_lat")× | ≤ 1.10× |
| burst: $BURST launches at once, wall time until all served | $(printf %.2f "$p_burst") s | $(printf %.2f "$f_burst") s | $(ratio "$p_burst" "$f_burst")× | |
| burst: nginx reloads | $burst_reloads | $BURST | | ≤ 5 |
| $REDEPLOYS redeploys under wrk load ($rate req/s through nginx, $requests requests) | $bad non-2xx, $socket_errors socket errors | same load, no redeploy ($base_rate req/s, $base_requests requests): $base_bad non-2xx, $base_socket socket errors | | 0 failed |
| previewd RSS idle / after the burst / peak | $((rss_idle / 1024)) / $((rss_burst / 1024)) / $((rss_peak / 1024)) MiB | | | |

Not measured yet (issue 5): 50 signed webhooks at once, 500 running previews (launch latency, list
latency, start-up reconcile, reload time), webhook intake with wrk at 500 req/s.
EOF
log "wrote BENCHMARKS.md"
cat BENCHMARKS.md
