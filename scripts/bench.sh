#!/usr/bin/env bash
# Measures previewd side by side with the floor (the same work by hand: docker run, one vhost,
# nginx -s reload, poll until 200) and writes BENCHMARKS.md. Not part of the tests: it takes
# minutes (at the default sizes, mostly launching the 500 previews) and wants a quiet machine.
# Usage: scripts/bench.sh [RUNS]   (default 10, or $BENCH_RUNS)
#   1. launch latency: POST /launch until the first 200 through nginx, vs the floor
#   2. burst: 50 launches at once, wall time and nginx reloads, vs the floor doing 50 in parallel
#   3. redeploy: 20 redeploys while GETs go through nginx at 100/s on kept-alive connections
#      (resent once when nginx closed the connection, as browsers do) and at 100/s on fresh
#      connections (scripts/bench-load.py): failed requests, vs the same load without redeploys
#   4. webhooks: 50 signed pull_request "opened" deliveries (GitHub's example payload, 50 PR
#      numbers) at once, wall time until all 50 previews are served and nginx reloads, vs the
#      floor doing 50 in parallel. previewd's feedback calls go to a fake GitHub API (python3).
#   5. webhook intake: signed deliveries for those 50 pull requests at 500 req/s (wrk has no rate
#      option: a Lua script paces it and gives each request its own X-GitHub-Delivery); each is
#      accepted (202) and queues a check that the preview runs that commit (at most one waiting
#      per pull request). Achieved rate, p50/p99, and when the queued work is done. Then bad
#      signatures (401) at wrk's full speed.
#   6. scale: 500 running previews (launched 8 at a time; fewer if the host runs short of
#      memory): launch latency, a redeploy's route step (nginx -t and reload with 500 vhosts)
#      and nginx -t, vs the same with 0 previews; the floor's launch latency at 0 and at 500
#      (its nginx holding the same vhosts) and Docker's container start (in previewd, and by
#      hand with and without a published port), to tell Docker's share;
#      GET /api/previews vs Docker's own list; a restart (SIGTERM, start, until /healthz says ok:
#      the start-up reconcile) vs the same by hand: stop an nginx that has the same vhosts, that
#      list, start it again
#   7. footprint: previewd's RSS idle, after the burst and its peak, with 500 previews and after
#      the restart
# Sizes can be overridden for a quick try, e.g. `BENCH_SCALE=30 BENCH_INTAKE_SECONDS=5
# scripts/bench.sh 2`: BENCH_RUNS, BENCH_BURST (50), BENCH_REDEPLOYS (20), BENCH_LOAD_RATE (100
# GETs/s in each of the two load modes during the redeploys), BENCH_SCALE (500),
# BENCH_SCALE_PARALLEL (8), BENCH_SCALE_BUDGET (1800 s to launch them), BENCH_MEM_RESERVE_MB
# (2048: stop launching below this much available memory), BENCH_INTAKE_RATE (500),
# BENCH_INTAKE_SECONDS (20), BENCH_FLOOD_SECONDS (10), BENCH_TIMEOUT (120 s for any one wait),
# BENCH_FIXTURE (the pull_request.opened payload; default tests/fixtures/github-webhooks/),
# BENCH_LOGS (a directory to keep previewd's, the fake GitHub's and wrk's logs in).
# Everything it starts is removed on exit, interrupted or not: containers by label, both nginx,
# previewd, the fake GitHub API, wrk, the temp dir.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${1:-${BENCH_RUNS:-10}}
BURST=${BENCH_BURST:-50}
REDEPLOYS=${BENCH_REDEPLOYS:-20}
LOAD_RATE=${BENCH_LOAD_RATE:-100}
SCALE=${BENCH_SCALE:-500}
SCALE_PARALLEL=${BENCH_SCALE_PARALLEL:-8}
SCALE_BUDGET=${BENCH_SCALE_BUDGET:-1800}
MEM_RESERVE_MB=${BENCH_MEM_RESERVE_MB:-2048}
INTAKE_RATE=${BENCH_INTAKE_RATE:-500}
INTAKE_SECONDS=${BENCH_INTAKE_SECONDS:-20}
FLOOD_SECONDS=${BENCH_FLOOD_SECONDS:-10}
WAIT_TIMEOUT=${BENCH_TIMEOUT:-120}
FIXTURE=${BENCH_FIXTURE:-$PWD/tests/fixtures/github-webhooks/pull_request.opened.json}
IMAGE=previewd-demo:latest
docker_socket=/var/run/docker.sock
[[ "${DOCKER_HOST:-}" != unix://* ]] || docker_socket=${DOCKER_HOST#unix://}
REPO_OWNER=previewd-bench
REPO_NAME=hello-world
FIRST_PR=1001

log() { echo "bench: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ -r "$FIXTURE" ] || die "no webhook fixture at $FIXTURE (set BENCH_FIXTURE)"
for tool in wrk jq; do
    command -v "$tool" >/dev/null || { log "installing $tool"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null; }
done
command -v python3 >/dev/null || { log "installing python3"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null; }
PREVIEWD_SKIP_BUILD=1 bash scripts/setup.sh
[ -x target/release/previewd ] || cargo build --release

work=$(mktemp -d)
instance="bench$RANDOM"
daemon=; gh_pid=; wrk_pid=; populate_pid=
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || shuf -i 20000-60000 -n 1; }
nginx_port=$(free_port); api_port=$(free_port); floor_port=$(free_port)
hash=$(printf %s bench | target/release/previewd hash-password)

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

stop_daemon() { # SIGTERM, then SIGKILL if previewd has not stopped within WAIT_TIMEOUT
    [ -n "$daemon" ] || return 0
    kill -TERM "$daemon" 2>/dev/null || true
    local deadline=$((SECONDS + WAIT_TIMEOUT))
    while kill -0 "$daemon" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.05; done
    kill -KILL "$daemon" 2>/dev/null && log "previewd did not stop within ${WAIT_TIMEOUT}s: killed"
    wait "$daemon" 2>/dev/null || true
    daemon=
}

cleanup() {
    set +e
    [ -n "$wrk_pid" ] && kill -INT "$wrk_pid" 2>/dev/null
    [ -n "$populate_pid" ] && kill "$populate_pid" 2>/dev/null
    for pid in ${keepalive_pid:-} ${fresh_pid:-}; do kill "$pid" 2>/dev/null; done
    stop_daemon
    [ -n "$gh_pid" ] && kill "$gh_pid" 2>/dev/null && wait "$gh_pid" 2>/dev/null
    for filter in "label=previewd.instance=$instance" "label=bench.floor=$instance"; do
        docker ps -aq --filter "$filter" | xargs -r -n 50 -P 4 docker rm -f >/dev/null 2>&1
    done
    # The previews' own networks (network.isolation), once their containers are gone.
    docker network ls -q --filter "label=previewd.instance=$instance" | xargs -r docker network rm >/dev/null 2>&1
    [ -f "$work/state/nginx/nginx.pid" ] && kill -QUIT "$(cat "$work/state/nginx/nginx.pid")" 2>/dev/null
    [ -f "$work/floor/nginx.pid" ] && kill -QUIT "$(cat "$work/floor/nginx.pid")" 2>/dev/null
    [ -n "${BENCH_LOGS:-}" ] && mkdir -p "$BENCH_LOGS" && cp "$work"/*.log "$work"/*.txt "$BENCH_LOGS"/ 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# --- A fake GitHub API for previewd's feedback ------------------------------------------------
# Answers the routes src/github/client.rs calls with GitHub's status codes and field names
# (state in memory, as tests/common/github.rs does in Rust), and logs one line per call.
cat >"$work/fake_github.py" <<'EOF'
import datetime, json, os, re, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOGIN = "previewd-bench"
HOOKS = sys.argv[2]  # the deliveries the bench sends, <number>.json
DOCS = "https://docs.github.com/rest"
lock = threading.Lock()
last_id = 0
comments = {}  # (repo, issue) -> [comment]


def next_id():
    global last_id
    with lock:
        last_id += 1
        return last_id


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def base(self):
        return "http://" + self.headers.get("Host", "127.0.0.1")

    def user(self):
        return {"login": LOGIN, "id": 4242, "node_id": "U_bench", "type": "User", "site_admin": False,
                "url": f"{self.base()}/users/{LOGIN}", "html_url": f"https://github.com/{LOGIN}"}

    def reply(self, status, body, note=""):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        with lock:
            sys.stdout.write(f"{self.command} {self.path} {status} {note}\n")
            sys.stdout.flush()

    def error(self, status, message):
        self.reply(status, {"message": message, "documentation_url": DOCS, "status": str(status)})

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return self.error(400, "Problems parsing JSON")
        if not self.headers.get("Authorization"):
            return self.error(401, "Requires authentication")
        path, method = self.path.split("?", 1)[0], self.command
        repo = re.match(r"^/repos/([^/]+/[^/]+)(/.*)$", path)
        rest = repo.group(2) if repo else None
        if method == "GET" and path == "/user":
            return self.reply(200, dict(self.user(), name=None, email=None))
        if repo and method == "GET" and re.fullmatch(r"/collaborators/[^/]+/permission", rest):
            return self.reply(200, {"permission": "admin", "role_name": "admin", "user": self.user()})
        if repo and method == "GET" and rest == "/pulls":
            return self.reply(200, [])
        m = re.fullmatch(r"/pulls/(\d+)", rest or "")
        if m and method == "GET":
            # GitHub holds what it delivered last: the pull request of the bench's delivery.
            try:
                with open(os.path.join(HOOKS, m.group(1) + ".json")) as f:
                    return self.reply(200, json.load(f)["pull_request"])
            except (OSError, ValueError, KeyError):
                return self.error(404, "Not Found")
        m = re.fullmatch(r"/issues/(\d+)/comments", rest or "")
        if m and method == "GET":
            with lock:
                items = list(comments.get((repo.group(1), m.group(1)), []))
            return self.reply(200, items)
        if m and method == "POST":
            comment = {"id": next_id(), "body": body.get("body"), "user": self.user(),
                       "html_url": f"https://github.com/{repo.group(1)}/pull/{m.group(1)}",
                       "created_at": now(), "updated_at": now(), "author_association": "OWNER"}
            comment["url"] = f"{self.base()}/repos/{repo.group(1)}/issues/comments/{comment['id']}"
            with lock:
                comments.setdefault((repo.group(1), m.group(1)), []).append(comment)
            return self.reply(201, comment)
        m = re.fullmatch(r"/issues/comments/(\d+)", rest or "")
        if m and method in ("PATCH", "POST"):
            with lock:
                found = [c for cs in comments.values() for c in cs if c["id"] == int(m.group(1))]
                for comment in found:
                    comment.update(body=body.get("body"), updated_at=now())
            return self.reply(200, found[0]) if found else self.error(404, "Not Found")
        if repo and method == "POST" and rest == "/deployments":
            deployment = {"id": next_id(), "sha": body.get("ref"), "ref": body.get("ref"), "task": body.get("task", "deploy"),
                          "payload": {}, "environment": body.get("environment"), "description": body.get("description"),
                          "transient_environment": body.get("transient_environment", False),
                          "production_environment": body.get("production_environment", False),
                          "creator": self.user(), "created_at": now(), "updated_at": now()}
            return self.reply(201, deployment, "environment=%s" % body.get("environment"))
        m = re.fullmatch(r"/deployments/(\d+)/statuses", rest or "")
        if m and method == "POST":
            status = {"id": next_id(), "state": body.get("state"), "description": body.get("description"),
                      "environment_url": body.get("environment_url"), "creator": self.user(),
                      "created_at": now(), "updated_at": now()}
            return self.reply(201, status, "state=%s" % body.get("state"))
        if m and method == "GET":
            return self.reply(200, [])
        return self.error(404, "Not Found")

    do_GET = do_POST = do_PATCH = handle_any


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
server.serve_forever()
EOF
python3 "$work/fake_github.py" "$work/github.port" "$work/hooks" >"$work/github.log" 2>&1 &
gh_pid=$!
until [ -s "$work/github.port" ]; do
    kill -0 "$gh_pid" 2>/dev/null || die "the fake GitHub API did not start: $(cat "$work/github.log")"
    sleep 0.05
done
openssl rand -hex 20 >"$work/webhook.secret"
echo bench-token >"$work/github.token"

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
# The bench launches hundreds of previews as one user, and its bursts all at once, as the floor
# does: the limits that protect a shared host would measure the queue instead.
limits: {max_previews: 100000, max_previews_per_user: 100000, parallel_launches: 1000}
github:
  api_url: http://127.0.0.1:$(cat "$work/github.port")
  webhook_secret_file: $work/webhook.secret
  token_file: $work/github.token
  # Off: the fake lists no open pull requests, so a sync would remove the webhook previews.
  sync_interval: 0
  repos:
    $REPO_OWNER/$REPO_NAME: {image: demo, name: "{{ repo }}-pr-{{ number }}"}
EOF

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { print b - a }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
wait_200() { # host port: polls until the URL answers 200 through nginx; fails after WAIT_TIMEOUT
    local deadline=$((SECONDS + WAIT_TIMEOUT))
    until [ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' --resolve "$1:$2:127.0.0.1" "http://$1:$2/")" = 200 ]; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "bench: $1 did not answer 200 within ${WAIT_TIMEOUT}s" >&2; return 1; }
        sleep 0.01
    done
}
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$daemon/status"; }
hwm_kb() { awk '/^VmHWM/ { print $2 }' "/proc/$daemon/status"; }
mem_available_mb() { awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo; }
reloads() { curl -s -m 10 "http://127.0.0.1:$api_port/healthz" | sed -n 's/.*"nginx_reloads":\([0-9]*\).*/\1/p'; }
metric() { # exact series, e.g. 'previewd_kills_total{result="success"}' -> its value, 0 when absent
    curl -s -m 30 "http://127.0.0.1:$api_port/metrics" | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'
}
log_count() { grep -c -F "\"message\":\"$1\"" "$work/previewd.log" || true; }

start_daemon() { # [timeout]: starts previewd, returns once /healthz says ok
    target/release/previewd serve --config "$work/config.yml" --log-format json 2>>"$work/previewd.log" &
    daemon=$!
    local deadline=$((SECONDS + ${1:-$WAIT_TIMEOUT}))
    until curl -s -m 30 "http://127.0.0.1:$api_port/healthz" 2>/dev/null | grep -q '"status":"ok"'; do
        kill -0 "$daemon" 2>/dev/null || { tail -5 "$work/previewd.log" >&2; daemon=; die "previewd exited"; }
        [ "$SECONDS" -lt "$deadline" ] || die "previewd was not healthy within ${1:-$WAIT_TIMEOUT}s"
        sleep 0.02
    done
}

floor_nginx
start_daemon
sleep 1
rss_idle=$(rss_kb)

launch() { curl -sf -m "$WAIT_TIMEOUT" -u bench:bench -d "image_name=demo&container_name=$1" "http://127.0.0.1:$api_port/launch" >/dev/null; }
kill_preview() { curl -sf -m "$WAIT_TIMEOUT" -u bench:bench -d "container_name=$1" "http://127.0.0.1:$api_port/kill" >/dev/null; }
floor_launch() { # name
    local id port
    id=$(docker run -d --label "bench.floor=$instance" -p 127.0.0.1::3000 "$IMAGE" /bin/busybox httpd -f -p 3000 -h /www)
    port=$(docker port "$id" 3000/tcp | head -1 | cut -d: -f2)
    printf 'server { listen 127.0.0.1:%s; server_name %s.floor.localhost; location / { proxy_pass http://127.0.0.1:%s; } }\n' \
        "$floor_port" "$1" "$port" >"$work/floor/sites/$1.conf"
    floor_nginx -s reload
    wait_200 "$1.floor.localhost" "$floor_port"
}
export -f floor_launch floor_nginx wait_200; export work instance floor_port IMAGE WAIT_TIMEOUT

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
seq "$BURST" | xargs -P "$BURST" -I{} curl -sf -o /dev/null -m "$WAIT_TIMEOUT" -u bench:bench -d "image_name=demo&container_name=burst-{}" "http://127.0.0.1:$api_port/launch"
for i in $(seq "$BURST"); do wait_200 "burst-$i.preview.localhost" "$nginx_port"; done
p_burst=$(since "$t")
burst_reloads=$(( $(reloads) - before ))
t=$(now)
seq "$BURST" | xargs -P "$BURST" -I{} bash -c 'floor_launch burst-{}' 2>/dev/null || true
f_burst=$(since "$t")
rss_burst=$(rss_kb); rss_peak=$(hwm_kb)

log "3. $REDEPLOYS redeploys under load, and the same load without them"
launch steady
load() { # mode rate seconds output: paced GETs of the steady preview through nginx
    python3 scripts/bench-load.py steady.preview.localhost "$nginx_port" "$2" "$3" "$1" "$work/stop-load" >"$4"
}
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" "$2"; } # name file
rm -f "$work/stop-load"
t=$(now)
load keepalive "$LOAD_RATE" 600 "$work/load-keepalive.txt" & keepalive_pid=$!
load fresh "$LOAD_RATE" 600 "$work/load-fresh.txt" & fresh_pid=$!
sleep 1
for i in $(seq "$REDEPLOYS"); do launch steady; done
sleep 1
touch "$work/stop-load"; wait "$keepalive_pid" "$fresh_pid"
seconds=$(since "$t" | awk '{ printf "%d", $1 + 0.5 }')
rm -f "$work/stop-load"
load keepalive "$LOAD_RATE" "$seconds" "$work/base-keepalive.txt" & keepalive_pid=$!
load fresh "$LOAD_RATE" "$seconds" "$work/base-fresh.txt" & fresh_pid=$!
wait "$keepalive_pid" "$fresh_pid"
load_row() { # output: "N requests (R/s): F failed (statuses), S resent"
    printf '%s requests (%s/s): %s failed (%s), %s resent' "$(field requests "$1")" "$(field rate "$1")" \
        "$(field failed "$1")" "$(field statuses "$1")" "$(field resent "$1")"
}

# --- 4. signed webhooks ------------------------------------------------------------------------
sign() { # file [secret]: hex HMAC-SHA256 of the file's bytes, as in X-Hub-Signature-256
    openssl dgst -sha256 -hmac "${2:-$(cat "$work/webhook.secret")}" "$1" | awk '{ print $NF }'
}
make_deliveries() { # hooks/<n>.json and .sig for PRs FIRST_PR.., and hooks/items.tsv (signature, body) for wrk
    local n sha at
    mkdir -p "$work/hooks"
    at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    : >"$work/hooks/items.tsv"
    for n in $(seq "$FIRST_PR" $((FIRST_PR + BURST - 1))); do
        sha=$(printf '%s-%s' "$instance" "$n" | sha1sum | cut -c1-40)
        jq -c --argjson n "$n" --arg sha "$sha" --arg ref "bench/pr-$n" --arg at "$at" \
            --arg owner "$REPO_OWNER" --arg name "$REPO_NAME" '
            .number = $n | .pull_request.number = $n
            | .pull_request.head.sha = $sha | .pull_request.head.ref = $ref
            | .pull_request.head.label = "\($owner):\($ref)" | .pull_request.updated_at = $at
            | (.repository, .pull_request.head.repo, .pull_request.base.repo) |=
                (.full_name = "\($owner)/\($name)" | .name = $name | .owner.login = $owner)' \
            "$FIXTURE" | tr -d '\n' >"$work/hooks/$n.json"
        sign "$work/hooks/$n.json" >"$work/hooks/$n.sig"
        printf '%s\t%s\n' "$(cat "$work/hooks/$n.sig")" "$(cat "$work/hooks/$n.json")" >>"$work/hooks/items.tsv"
    done
}
deliver() { # PR number: its signed delivery with a new delivery id, as GitHub sends it; writes the
    # status and how long the answer took
    curl -s -m "$WAIT_TIMEOUT" -o "$work/hooks/$1.answer" -w '%{http_code} %{time_total}\n' \
        -H 'Content-Type: application/json' -H 'User-Agent: GitHub-Hookshot/bench' \
        -H 'X-GitHub-Event: pull_request' -H "X-GitHub-Delivery: $(cat /proc/sys/kernel/random/uuid)" \
        -H "X-Hub-Signature-256: sha256=$(cat "$work/hooks/$1.sig")" \
        --data-binary "@$work/hooks/$1.json" "http://127.0.0.1:$api_port/webhooks/github" >"$work/hooks/$1.code" || true
}
export -f deliver; export api_port

bench_webhooks() {
    log "4. $BURST signed pull_request webhooks at once"
    make_deliveries
    local before t n deadline
    before=$(reloads)
    t=$(now)
    seq "$FIRST_PR" $((FIRST_PR + BURST - 1)) | xargs -P "$BURST" -I{} bash -c 'deliver {}'
    hook_202=$(cat "$work"/hooks/*.code | awk '$1 == 202 { n++ } END { print n + 0 }')
    hook_slowest=$(cat "$work"/hooks/*.code | awk '$2 > max { max = $2 } END { print max + 0 }')
    [ "$hook_202" = "$BURST" ] || log "only $hook_202 of $BURST deliveries answered 202: $(cut -d' ' -f1 "$work"/hooks/*.code | sort | uniq -c | tr '\n' ' ')"
    for n in $(seq "$FIRST_PR" $((FIRST_PR + BURST - 1))); do wait_200 "$REPO_NAME-pr-$n.preview.localhost" "$nginx_port"; done
    p_hooks=$(since "$t")
    hook_reloads=$(( $(reloads) - before ))
    t=$(now)
    seq "$BURST" | xargs -P "$BURST" -I{} bash -c 'floor_launch hook-{}' 2>/dev/null || true
    f_hooks=$(since "$t")
    # Feedback runs in the background: wait (bounded) for every PR's "success" status.
    deadline=$((SECONDS + WAIT_TIMEOUT))
    until [ "$(grep -c 'state=success' "$work/github.log")" -ge "$BURST" ] || [ "$SECONDS" -ge "$deadline" ]; do sleep 0.2; done
    hook_success=$(grep -c 'state=success' "$work/github.log" || true)
    hook_comments=$(grep -c '^POST /repos/.*/comments 201' "$work/github.log" || true)
    hook_api_errors=$(grep -vc ' 20[01] ' "$work/github.log" || true)
}

# --- 5. webhook intake -----------------------------------------------------------------------
# wrk has no rate option (and Debian has no wrk2): delay() spaces each thread's requests on a
# monotonic clock (LuaJIT's ffi); a rate of 0 sends as fast as the connections allow. Every
# request gets its own X-GitHub-Delivery (previewd drops redeliveries): the signature covers
# only the body, so the precomputed one stays valid. done() prints how many got the expected status.
cat >"$work/deliveries.lua" <<'EOF'
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *ts);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

-- args: items file (hex signature TAB body per line), total rate (0: unpaced), threads,
-- expected status, run id (8 hex digits)
function init(args)
  items = {}
  for line in io.lines(args[1]) do
    local sig, body = line:match("^(%x+)\t(.+)$")
    if sig then items[#items + 1] = { sig = sig, body = body } end
  end
  local rate = tonumber(args[2])
  if rate > 0 then interval = 1000 * tonumber(args[3]) / rate else delay = nil end
  expected, run = tonumber(args[4]), args[5]
  sent, good, bad, other = 0, 0, 0, ""
end

function delay()
  local t = now_ms()
  -- the next free slot; slots missed while every connection was busy are dropped, not caught up
  due = math.max((due or t) + interval, t - interval)
  return math.max(0, due - t)
end

function request()
  sent = sent + 1
  local item = items[(sent + thread_id) % #items + 1]
  return wrk.format("POST", "/webhooks/github", {
    ["Content-Type"] = "application/json",
    ["User-Agent"] = "GitHub-Hookshot/bench",
    ["X-GitHub-Event"] = "pull_request",
    ["X-GitHub-Delivery"] = string.format("%s-%04x-4000-8000-%012x", run, thread_id, sent),
    ["X-Hub-Signature-256"] = "sha256=" .. item.sig,
  }, item.body)
end

function response(status, headers, body)
  if status == expected then
    good = good + 1
  else
    bad = bad + 1
    if #other < 100 then other = other .. " " .. status end
  end
end

function done(summary, latency, requests)
  local good_all, bad_all, other_all = 0, 0, ""
  for _, thread in ipairs(threads) do
    good_all, bad_all = good_all + thread:get("good"), bad_all + thread:get("bad")
    other_all = other_all .. thread:get("other")
  end
  io.write(string.format("bench-statuses %d %d%s\n", good_all, bad_all, other_all))
end
EOF
wrk_summary() { # wrk --latency output -> "rate p50_ms p99_ms requests socket_errors expected unexpected"
    awk 'function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /m$/) return v * 60000; if (v ~ /s$/) return v * 1000; return v + 0 }
         /requests in/ { n = $1 } /Socket errors/ { gsub(",", ""); sock = $4 + $6 + $8 + $10 } /Requests\/sec/ { rate = $2 }
         $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) } $1 == "bench-statuses" { good = $2; bad = $3 }
         END { printf "%.0f %.2f %.2f %d %d %d %d\n", rate, p50, p99, n, sock, good, bad }' "$1"
}
deliveries() { # seconds rate expected items output: wrk POSTing signed deliveries
    wrk -t 2 -c 50 -d "${1}s" --timeout 10s --latency -s "$work/deliveries.lua" "http://127.0.0.1:$api_port" \
        -- "$4" "$2" 2 "$3" "$(openssl rand -hex 4)" >"$5" 2>&1 &
    wrk_pid=$!
    wait "$wrk_pid" || true
    wrk_pid=
}

bench_intake() {
    log "5. webhook intake: $INTAKE_RATE deliveries/s for ${INTAKE_SECONDS}s, then bad signatures for ${FLOOD_SECONDS}s"
    local accepted0 checks0 launches0 t deadline
    accepted0=$(metric 'previewd_webhook_deliveries_total{event="pull_request",outcome="accepted"}')
    launches0=$(( $(metric 'previewd_launches_total{result="success"}') + $(metric 'previewd_redeploys_total{result="success"}') ))
    checks0=$(log_count 'preview already runs the head commit')
    deliveries "$INTAKE_SECONDS" "$INTAKE_RATE" 202 "$work/hooks/items.tsv" "$work/intake.txt"
    t=$(now)
    read -r intake_rate intake_p50 intake_p99 intake_requests intake_socket intake_good _ < <(wrk_summary "$work/intake.txt")
    intake_other=$(awk '$1 == "bench-statuses" { for (i = 4; i <= NF; i++) n[$i]++ }
        END { for (s in n) printf " %d× %s", n[s], s }' "$work/intake.txt")
    intake_accepted=$(( $(metric 'previewd_webhook_deliveries_total{event="pull_request",outcome="accepted"}') - accepted0 ))
    # Accepted deliveries queue runs that check the preview runs the delivered commit; a pull
    # request has at most one run waiting, which reads its newest state.
    deadline=$((SECONDS + WAIT_TIMEOUT))
    while [ "$(metric previewd_pull_request_runs)" != 0 ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
    intake_runs=$(( $(log_count 'preview already runs the head commit') - checks0 ))
    if [ "$(metric previewd_pull_request_runs)" = 0 ]; then
        intake_drain="$(printf %.1f "$(since "$t")") s after the last delivery ($intake_runs runs for $intake_accepted accepted deliveries)"
    else
        intake_drain="not within ${WAIT_TIMEOUT} s of the last delivery ($intake_runs runs done)"
    fi
    intake_launches=$(( $(metric 'previewd_launches_total{result="success"}') + $(metric 'previewd_redeploys_total{result="success"}') - launches0 ))

    local rejected0
    rejected0=$(metric 'previewd_webhook_deliveries_total{event="unverified",outcome="rejected"}')
    printf '%s\t%s\n' "$(sign "$work/hooks/$FIRST_PR.json" "not-the-secret")" "$(cat "$work/hooks/$FIRST_PR.json")" >"$work/hooks/bad.tsv"
    deliveries "$FLOOD_SECONDS" 0 401 "$work/hooks/bad.tsv" "$work/flood.txt"
    read -r flood_rate flood_p50 flood_p99 flood_requests flood_socket flood_good _ < <(wrk_summary "$work/flood.txt")
    flood_rejected=$(( $(metric 'previewd_webhook_deliveries_total{event="unverified",outcome="rejected"}') - rejected0 ))
}

# --- 6. scale ----------------------------------------------------------------------------------
scale_launch() { # i: launches scale-i unless the run was stopped; stops it when the host runs short
    [ ! -s "$work/scale.stop" ] || return 0
    local avail out
    avail=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
    if [ "$avail" -lt "$MEM_RESERVE_MB" ]; then
        echo "the host's available memory fell to $avail MiB (reserve: $MEM_RESERVE_MB MiB)" >>"$work/scale.stop"; return 0
    fi
    if [ "$(date +%s)" -ge "$scale_deadline" ]; then
        echo "the time budget of ${SCALE_BUDGET}s ran out" >>"$work/scale.stop"; return 0
    fi
    out=$(curl -s -m 300 -u bench:bench -w '\n%{http_code}' -d "image_name=demo&container_name=scale-$1" "http://127.0.0.1:$api_port/launch" 2>&1) || true
    [ "${out##*$'\n'}" = 200 ] || echo "the launch of scale-$1 failed: $(printf %s "$out" | tr '\n' ' ' | cut -c1-200)" >>"$work/scale.stop"
    [ $(($1 % 50)) != 0 ] || echo "bench: launched up to scale-$1" >&2
}
export -f scale_launch; export MEM_RESERVE_MB SCALE_BUDGET

docker_list() { # what previewd asks Docker for a list, straight from the Engine API (the docker CLI's
    # --format json would ask for sizes, slow on fuse-overlayfs)
    curl -sf -m 60 --unix-socket "$docker_socket" -G "http://localhost/containers/json" --data-urlencode all=true \
        --data-urlencode "filters={\"label\":[\"previewd.managed=true\",\"previewd.instance=$instance\"]}"
}
managed_nginx_test() { nginx -t -q -p "$work/state/nginx" -c "$work/state/nginx/nginx.conf" -e "$work/state/nginx/error.log"; }
docker_start_ms() { # [docker run args]: creates a demo container, times Docker's start API call alone (ms), removes it
    local id t
    id=$(docker create --label "bench.floor=$instance" "$@" "$IMAGE" /bin/busybox httpd -f -p 3000 -h /www)
    t=$(now)
    curl -sf -m 60 -o /dev/null --unix-socket "$docker_socket" -X POST "http://localhost/containers/$id/start"
    awk -v a="$t" -v b="$(now)" 'BEGIN { printf "%.0f\n", (b - a) * 1000 }'
    docker rm -f "$id" >/dev/null
}
floor_mirror_vhosts() { # the floor's nginx gets previewd's vhosts (moved to the floor's port) and no others
    local f
    rm -f "$work"/floor/sites/*.conf
    for f in "$work"/state/nginx/sites/*.conf; do
        [ -e "$f" ] || continue
        sed "s/127\.0\.0\.1:$nginx_port/127.0.0.1:$floor_port/" "$f" >"$work/floor/sites/${f##*/}"
    done
}
floor_restart() { # probe: previewd's restart by hand: stop an nginx that has previewd's vhosts
    # (moved to the floor's port) gracefully, list the containers, start nginx again, until the
    # probe is served; sets restart_floor
    local pid t
    floor_mirror_vhosts
    floor_nginx -s reload
    sleep 1
    pid=$(cat "$work/floor/nginx.pid")
    t=$(now)
    floor_nginx -s quit
    # Until it is gone or a zombie: its parent here is init, which may reap it only later.
    while [ -r "/proc/$pid/stat" ] && [ "$(awk '{ print $3 }' "/proc/$pid/stat")" != Z ]; do sleep 0.01; done
    docker_list >/dev/null
    floor_nginx
    wait_200 "$1.preview.localhost" "$floor_port"
    restart_floor=$(since "$t")
}
scale_point() { # tag: sets point_lat (median of RUNS launches, each killed again), point_route (mean
    # route step of a redeploy of each, from /metrics: a new preview's route may overlap its
    # start, a redeploy's cannot), point_nginx_t (median of 3 nginx -t), point_start (mean of
    # Docker's container start, from /metrics) and point_floor (median of RUNS floor launches,
    # its nginx holding the same vhosts as previewd's)
    local i t sum0 count0 sum1 count1 start_sum start_count
    : >"$work/lat-$1.txt"; : >"$work/nginx-t-$1.txt"; : >"$work/route-$1.txt"; : >"$work/floor-$1.txt"
    start_sum=$(metric 'previewd_launch_step_seconds_sum{step="start"}')
    start_count=$(metric 'previewd_launch_step_seconds_count{step="start"}')
    for i in $(seq "$RUNS"); do
        t=$(now); launch "probe-$1-$i"; wait_200 "probe-$1-$i.preview.localhost" "$nginx_port"; since "$t" >>"$work/lat-$1.txt"
        sum0=$(metric 'previewd_launch_step_seconds_sum{step="route"}')
        count0=$(metric 'previewd_launch_step_seconds_count{step="route"}')
        launch "probe-$1-$i"
        sum1=$(metric 'previewd_launch_step_seconds_sum{step="route"}')
        count1=$(metric 'previewd_launch_step_seconds_count{step="route"}')
        awk -v s0="$sum0" -v c0="$count0" -v s1="$sum1" -v c1="$count1" 'BEGIN { if (c1 > c0) print (s1 - s0) / (c1 - c0) }' >>"$work/route-$1.txt"
        kill_preview "probe-$1-$i"
    done
    point_start=$(awk -v s0="$start_sum" -v c0="$start_count" -v s1="$(metric 'previewd_launch_step_seconds_sum{step="start"}')" \
        -v c1="$(metric 'previewd_launch_step_seconds_count{step="start"}')" 'BEGIN { print (c1 > c0 ? (s1 - s0) / (c1 - c0) : 0) }')
    point_route=$(awk '{ s += $1 } END { print NR ? s / NR : 0 }' "$work/route-$1.txt")
    floor_mirror_vhosts
    for i in $(seq "$RUNS"); do
        t=$(now); floor_launch "scale-floor-$1-$i"; since "$t" >>"$work/floor-$1.txt"
        docker rm -f "$(docker ps -q --filter "label=bench.floor=$instance" | head -1)" >/dev/null
    done
    rm -f "$work"/floor/sites/*.conf; floor_nginx -s reload
    point_floor=$(median <"$work/floor-$1.txt")
    # Docker's start alone, with the port published as previewd and the floor do and without.
    : >"$work/start-p-$1.txt"; : >"$work/start-nop-$1.txt"
    for i in $(seq "$RUNS"); do
        docker_start_ms -p 127.0.0.1::3000 >>"$work/start-p-$1.txt"
        docker_start_ms >>"$work/start-nop-$1.txt"
    done
    point_start_p=$(median <"$work/start-p-$1.txt"); point_start_nop=$(median <"$work/start-nop-$1.txt")
    for i in 1 2 3; do t=$(now); managed_nginx_test; since "$t" >>"$work/nginx-t-$1.txt"; done
    point_lat=$(median <"$work/lat-$1.txt"); point_nginx_t=$(median <"$work/nginx-t-$1.txt")
}

bench_scale() {
    log "6. scale: $SCALE running previews ($SCALE_PARALLEL launches at a time)"
    local t mem0 i probe
    # From nothing: the earlier parts' previews killed through the API, the floor's containers removed.
    curl -sf -m 60 -u bench:bench "http://127.0.0.1:$api_port/api/previews" | jq -r '.[].name' |
        xargs -r -P 8 -I{} curl -s -o /dev/null -m "$WAIT_TIMEOUT" -u bench:bench -d 'container_name={}' "http://127.0.0.1:$api_port/kill"
    docker ps -aq --filter "label=bench.floor=$instance" | xargs -r -n 50 -P 4 docker rm -f >/dev/null
    rm -f "$work"/floor/sites/*.conf; floor_nginx -s reload
    sleep 1
    scale_point 0; lat0=$point_lat; route0=$point_route; nginx_t0=$point_nginx_t; start0=$point_start; floor0=$point_floor
    start_p0=$point_start_p; start_nop0=$point_start_nop

    mem0=$(mem_available_mb)
    scale_deadline=$(( $(date +%s) + SCALE_BUDGET )); export scale_deadline
    t=$(now)
    # In the background, so that a signal reaches the trap (and cleanup) without waiting for it.
    seq "$SCALE" | xargs -P "$SCALE_PARALLEL" -I{} bash -c 'scale_launch {}' &
    populate_pid=$!
    wait "$populate_pid"
    populate_pid=
    scale_fill=$(since "$t")
    reached=$(docker ps -q --filter "label=previewd.instance=$instance" --filter status=running | wc -l)
    scale_why=$(head -1 "$work/scale.stop" 2>/dev/null || true)
    [ -z "$scale_why" ] || log "stopped at $reached previews: $scale_why"
    scale_mem=$(( (mem0 - $(mem_available_mb)) / (reached > 0 ? reached : 1) ))
    scale_limits="ulimit -n $(ulimit -n), previewd's $(awk '/^Max open files/ { print $4 }' "/proc/$daemon/limits"), $(cat /proc/sys/kernel/threads-max) threads-max"
    rss_scale=$(rss_kb)

    scale_point n; latN=$point_lat; routeN=$point_route; nginx_tN=$point_nginx_t; startN=$point_start; floorN=$point_floor
    start_pN=$point_start_p; start_nopN=$point_start_nop

    : >"$work/list.txt"; : >"$work/docker-ps.txt"
    curl -sf -m 60 -o /dev/null -u bench:bench "http://127.0.0.1:$api_port/api/previews" # authenticates once (argon2)
    for i in 1 2 3 4 5; do
        curl -sf -m 60 -o "$work/list.json" -w '%{time_total}\n' -u bench:bench "http://127.0.0.1:$api_port/api/previews" >>"$work/list.txt"
        t=$(now); docker_list >/dev/null; since "$t" >>"$work/docker-ps.txt"
    done
    list_n=$(jq length "$work/list.json")
    list_p=$(median <"$work/list.txt"); list_f=$(median <"$work/docker-ps.txt")

    log "restart with $reached previews"
    probe=$(jq -r '[.[] | select(.status == "running")][0].name' "$work/list.json")
    rss_scale_peak=$(hwm_kb)
    t=$(now)
    stop_daemon
    restart_stop=$(since "$t")
    local t2; t2=$(now)
    start_daemon 900
    restart_start=$(since "$t2")
    restart_total=$(since "$t")
    if [ "$probe" != null ] && wait_200 "$probe.preview.localhost" "$nginx_port"; then
        restart_dark="$(printf %.2f "$(since "$t")") s"
        floor_restart "$probe"
    else
        restart_dark="not measured (no preview to probe)"; restart_floor=0
    fi
    restart_report=$(jq -rR 'fromjson? | select(.fields.message == "reconciled") | .fields
        | "routed \(.routed), removed \(.removed_containers) containers and \(.removed_vhosts) vhosts, \(.failed) failed"' \
        "$work/previewd.log" | tail -1)
    sleep 1
    rss_restart=$(rss_kb)
}

bench_webhooks
bench_intake
bench_scale

unexpected_log=$(jq -rR 'fromjson? | select(.level == "WARN" or .level == "ERROR") | .fields.message' "$work/previewd.log" |
    sort | uniq -c | sort -rn | head -5 | awk '{ $1 = $1 "×"; print }' | paste -sd ';' -)
[ -z "$unexpected_log" ] || log "previewd warnings and errors: $unexpected_log"

f2() { printf %.2f "$1"; }
f3() { printf %.3f "$1"; }
ms() { awk -v s="$1" 'BEGIN { printf "%.1f", s * 1000 }'; }
if [ "$reached" -lt "$SCALE" ]; then scale_n="$reached previews (of $SCALE: ${scale_why:-see the log})"; else scale_n="$reached previews"; fi
overrides=$(env | grep -E '^BENCH_[A-Z_]+=' | sort | tr '\n' ' ' || true)
cpu=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
cat >BENCHMARKS.md <<EOF
# Benchmarks

Measured by \`${overrides}scripts/bench.sh $RUNS\` on $(date -u +%Y-%m-%d): $(nproc) cores ($cpu), $(free -g | awk '/Mem:/ { print $2 }') GiB,
Docker $(docker version --format '{{.Server.Version}}'), $(nginx -v 2>&1 | sed 's/.*: //'), previewd $(git rev-parse --short HEAD) (release build).
The floor is the same work done by hand in the same run: \`docker run -d -p 127.0.0.1::3000\`, one vhost,
\`nginx -s reload\`, poll until the URL answers 200. Where there is no floor, the scale rows compare
with the same figure at 0 previews. Webhooks are GitHub's example \`pull_request\` \`opened\` payload
with other PR numbers, signed like GitHub signs them; previewd's feedback goes to a fake GitHub API
on loopback. This machine is shared and noisy: compare the ratios, not the absolute times.

| figure | previewd | floor | ratio | target |
| --- | --- | --- | --- | --- |
| launch latency, median of $RUNS (request to first 200 through nginx) | $(f3 "$p_lat") s | $(f3 "$f_lat") s | $(ratio "$p_lat" "$f_lat")× | ≤ 1.10× |
| burst: $BURST launches at once, wall time until all served | $(f2 "$p_burst") s | $(f2 "$f_burst") s | $(ratio "$p_burst" "$f_burst")× | |
| burst: nginx reloads | $burst_reloads | $BURST | | ≤ 5 |
| $REDEPLOYS redeploys of one preview while GETs go through nginx at $LOAD_RATE/s on kept-alive connections (as a browser: a request on a connection nginx closed as the reload retired its worker is sent again once, counted as resent) and at $LOAD_RATE/s on fresh connections | kept-alive: $(load_row "$work/load-keepalive.txt"); fresh: $(load_row "$work/load-fresh.txt") | same load, no redeploy: kept-alive: $(load_row "$work/base-keepalive.txt"); fresh: $(load_row "$work/base-fresh.txt") | | 0 failed |
| webhooks: $BURST signed \`pull_request\` \`opened\` deliveries at once, wall time until all $BURST previews served ($hook_202 answered 202, the slowest in $(f3 "$hook_slowest") s; feedback: $hook_success \`success\` statuses, $hook_comments comments, $hook_api_errors failed API calls) | $(f2 "$p_hooks") s | $(f2 "$f_hooks") s | $(ratio "$p_hooks" "$f_hooks")× | |
| webhooks: nginx reloads | $hook_reloads | $BURST | | ≤ 5 |
| webhook intake: signed deliveries for the $BURST running PR previews, paced at $INTAKE_RATE/s for ${INTAKE_SECONDS}s (wrk + Lua, 50 connections); each answered 202 queues a check of the running commit (at most one waiting per pull request), which launches nothing | $intake_rate req/s, p50 $intake_p50 ms, p99 $intake_p99 ms; $intake_good of $intake_requests answered 202${intake_other:+ (others:$intake_other)}, $intake_socket socket errors; queued work done $intake_drain; $intake_launches launches | | | $INTAKE_RATE req/s, all 202 |
| bad signatures, wrk at full speed for ${FLOOD_SECONDS}s (50 connections) | $flood_rate req/s, p50 $flood_p50 ms, p99 $flood_p99 ms; $flood_good of $flood_requests answered 401 (counted rejected: $flood_rejected), $flood_socket socket errors | | | |
| scale: launch latency with $scale_n running, median of $RUNS ($(f2 "$scale_fill") s to launch them $SCALE_PARALLEL at a time; ≈ $scale_mem MiB of host memory each; $scale_limits) | $(f3 "$latN") s | 0 previews: $(f3 "$lat0") s. The floor, its nginx holding the same vhosts: $(f3 "$floor0") s at 0, $(f3 "$floorN") s at $reached ($(ratio "$floorN" "$floor0")×); Docker's container start alone, mean in previewd: $(f3 "$start0") s at 0, $(f3 "$startN") s at $reached; by hand, median of $RUNS: with a port published on 127.0.0.1 $start_p0 ms at 0, $start_pN ms at $reached, without $start_nop0 ms at 0, $start_nopN ms at $reached | $(ratio "$latN" "$lat0")× (floor: $(ratio "$floorN" "$floor0")×) | ≤ 1.20× |
| scale: GET /api/previews with $list_n previews, median of 5 | $(f3 "$list_p") s | the same list from Docker's API: $(f3 "$list_f") s | $(ratio "$list_p" "$list_f")× | |
| scale: restart with $reached previews, SIGTERM until /healthz says ok (stop $(f2 "$restart_stop") s, start and reconcile $(f2 "$restart_start") s: $restart_report); previews unreachable meanwhile: $restart_dark | $(f2 "$restart_total") s | by hand: stop an nginx with the same vhosts, Docker's list, start it until a preview is served: $(f2 "$restart_floor") s | $(ratio "$restart_total" "$restart_floor")× | |
| scale: route step of a redeploy (vhost, \`nginx -t\`, reload, until only new workers accept), mean of $RUNS, with $reached vhosts | $(ms "$routeN") ms | 0 previews: $(ms "$route0") ms | $(ratio "$routeN" "$route0")× | |
| scale: \`nginx -t\` of previewd's nginx config, median of 3, with $reached vhosts | $(ms "$nginx_tN") ms | 0 previews: $(ms "$nginx_t0") ms | $(ratio "$nginx_tN" "$nginx_t0")× | |
| previewd RSS idle / after the burst / peak during the burst / with $reached previews (peak until then) / after restarting with them | $((rss_idle / 1024)) / $((rss_burst / 1024)) / $((rss_peak / 1024)) / $((rss_scale / 1024)) ($((rss_scale_peak / 1024))) / $((rss_restart / 1024)) MiB | | | |

A Docker engine restart is not benchmarked (it would disturb everything else on the machine):
\`scripts/drills.sh\` drills it against a second engine of its own, as part of \`scripts/test.sh\`.
EOF
log "wrote BENCHMARKS.md"
cat BENCHMARKS.md
