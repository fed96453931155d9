#!/usr/bin/env python3
"""Measures previewd side by side with the floor and writes BENCHMARKS.md.

The floor is the same work done by hand in the same run: `docker run -d -p 127.0.0.1::3000`, one
vhost, `nginx -s reload`, poll until 200. Not part of the tests: it takes minutes (at the default
sizes, mostly launching the 500 previews) and wants a quiet machine. Python 3 standard library
only; it also runs wrk (installed from Debian when missing), nginx, the docker CLI, cargo, and
scripts/bench-load.py.

Usage: scripts/bench.py [RUNS]   (default 10, or $BENCH_RUNS)

What it measures, by section; BENCH_ONLY=NAME[,NAME...] runs only those (intake needs the
webhooks' previews and runs that section too). BENCHMARKS.md keeps the last full run's table
whole: a run of some of its sections is written below it, under "A run of some sections", with
its command; the whole-environments, builds and sleep sections are each replaced only by a run
of them:

  launch        1. launch latency: POST /launch until the first 200 through nginx, vs the floor
  burst         2. burst: 50 launches at once, wall time and nginx reloads, vs the floor doing 50
                   in parallel
  redeploy      3. redeploys: 20 redeploys while GETs go through nginx at 100/s on kept-alive
                   connections (resent once when nginx closed the connection, as browsers do)
                   and at 100/s on fresh connections (scripts/bench-load.py): failed requests,
                   vs the same load without redeploys
  webhooks      4. webhooks: 50 signed pull_request "opened" deliveries (GitHub's example
                   payload, 50 PR numbers) at once, wall time until all 50 previews are served
                   and nginx reloads, vs the floor doing 50 in parallel. previewd's feedback
                   calls go to the tests' fake GitHub API, run by examples/fake_github.rs.
  intake        5. webhook intake: signed deliveries for those 50 pull requests at 500 req/s (wrk
                   has no rate option: a Lua script paces it and gives each request its own
                   X-GitHub-Delivery); each is accepted (202) and queues a check that the preview
                   runs that commit (at most one waiting per pull request). Achieved rate,
                   p50/p99, and when the queued work is done. Then bad signatures (401) at wrk's
                   full speed.
  environments  6. whole environments: the shop (previewd-shop:demo, a PostgreSQL seeded from the
                   volume shop-db-seed, a Redis, the migration job): its launch until /api/state
                   through nginx shows the 10,000 seeded products and the migration, vs the same
                   by hand with the docker CLI in the same run (alternating which goes first);
                   a redeploy of it vs that launch; its kill vs the same by hand; the memory of
                   its containers after 10 s idle; and that its kill leaves nothing behind
  builds        7. builds from source: a small app (Dockerfile FROM previewd-demo:latest, a run-
                   unique RUN echo, RUN sleep 1, COPY site/, CMD) uploaded to POST /api/builds,
                   cold (no layer cache) until its first 200 through nginx, vs `docker build`
                   (classic builder) of the same context and the floor's launch; a one-file change
                   of site/ uploaded again (RUN layers from cache) until the new page is served,
                   vs `docker build` again and the floor replacing its container (run the new one,
                   vhost, reload, until served, rm the old); a signed pull_request "synchronize"
                   delivery of a repository with `build:` until the new commit's page is served
                   (previewd reads the pull request, downloads the commit's tarball from the fake
                   GitHub's codeload, builds, replaces), vs the floor downloading its own commit's
                   tarball the same way, extracting it, `docker build` and replacing; each run
                   alternates which goes first. Then previewd's RSS
                   while a context of 200 MiB of random bytes is uploaded (sampled every 10 ms),
                   and while it is built and launched
  sleep         8. sleep and wake: the demo preview put to sleep (POST /api/previews/NAME/sleep),
                   then one GET through nginx, held by previewd until the woken app answers it,
                   vs `docker stop` and `docker start` of a container of the same image until
                   its port answers; 50 concurrent first requests to one sleeping preview (one
                   wake, 50 answers); the host's MemAvailable with 20 previews awake, then asleep
  scale         8. scale: 500 running previews (launched 8 at a time; fewer if the host runs
                   short of memory): launch latency, a redeploy's route step (nginx -t and reload
                   with 500 vhosts) and nginx -t, vs the same with 0 previews; the floor's launch
                   latency at 0 and at 500 (its nginx holding the same vhosts) and Docker's
                   container start (in previewd, and by hand with and without a published port),
                   to tell Docker's share; GET /api/previews vs Docker's own list; a restart
                   (SIGTERM, start, until /healthz says ok: the start-up reconcile) vs the same
                   by hand: stop an nginx that has the same vhosts, that list, start it again
  (footprint)   9. previewd's RSS idle, after the burst and its peak, with 500 previews and
                   after the restart: of the sections that ran

Sizes can be overridden for a quick try, e.g. `BENCH_SCALE=30 BENCH_INTAKE_SECONDS=5
scripts/bench.py 2`: BENCH_RUNS, BENCH_BURST (50), BENCH_REDEPLOYS (20), BENCH_LOAD_RATE (100
GETs/s in each of the two load modes during the redeploys), BENCH_SCALE (500),
BENCH_SCALE_PARALLEL (8), BENCH_SCALE_BUDGET (1800 s to launch them), BENCH_MEM_RESERVE_MB (2048:
stop launching below this much available memory), BENCH_INTAKE_RATE (500), BENCH_INTAKE_SECONDS
(20), BENCH_FLOOD_SECONDS (10), BENCH_ENV_IDLE (10 s an environment sits idle before its memory
is read), BENCH_UPLOAD_MIB (200: the random bytes of the context uploaded while previewd's memory
is read), BENCH_TIMEOUT (120 s for any one wait), BENCH_FIXTURE (the pull_request.opened payload;
default tests/fixtures/github-webhooks/), BENCH_LOGS (a directory to keep previewd's, the fake
GitHub's and wrk's logs in), BENCH_ONLY (above).

Everything it starts is removed on exit, interrupted or not: containers, networks and volumes by
their labels (previewd's instance label, and bench.floor=<instance> on what it makes by hand),
the images previewd built (its instance label) and those the floor built (bench-<instance>/...),
both nginx, previewd, the fake GitHub API, wrk, the load generators, the temp dir.
"""

import base64
import concurrent.futures
import datetime
import hashlib
import hmac
import http.client
import io
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("launch", "burst", "redeploy", "webhooks", "intake", "environments", "builds", "sleep", "scale")
ENV_HEADING = "## Whole environments"
BUILDS_HEADING = "## Builds from source"
SLEEP_HEADING = "## Sleep and wake"
# Sections with a part of BENCHMARKS.md of their own, replaced only by a run of them, in this order.
SEPARATE = {"environments": ENV_HEADING, "builds": BUILDS_HEADING, "sleep": SLEEP_HEADING}
MAIN_SECTIONS = tuple(s for s in SECTIONS if s not in SEPARATE)
# Where a run of only some of the main sections (BENCH_ONLY) goes, below the last full run's table.
PARTIAL_HEADING = "## A run of some sections"

IMAGE = "previewd-demo:latest"
USER, PASSWORD = "bench", "bench"
REPO_OWNER, REPO_NAME = "previewd-bench", "hello-world"
FIRST_PR = 1001
GITHUB_TOKEN = "bench-token"
BASE_DOMAIN = "preview.localhost"
FLOOR_DOMAIN = "floor.localhost"
DEMO_COMMAND = ["/bin/busybox", "httpd", "-f", "-p", "3000", "-h", "/www"]

# The builds section: a repository whose pull requests previewd builds from their source.
BUILD_REPO_NAME, BUILD_PR = "builds-app", 2001

# The shop environment, as tests/environments.rs defines it.
SHOP_IMAGE, POSTGRES_IMAGE, REDIS_IMAGE = "previewd-shop:demo", "previewd-postgres:15", "previewd-redis:7"
SEED_VOLUME = "shop-db-seed"
SHOP_PRODUCTS = 10_000  # rows in the seed (scripts/shop-seed.sh)
SHOP_ENV = {"DATABASE_URL": "postgres://app:app@db:5432/app", "REDIS_URL": "redis://cache:6379/0"}
POSTGRES_ENV = {"POSTGRES_USER": "app", "POSTGRES_PASSWORD": "app", "POSTGRES_DB": "app"}
PG_READY = ["pg_isready", "-h", "127.0.0.1", "-U", "app", "-d", "app"]
# What previewd gives every container (src/docker.rs): its hardening and log rotation.
HARDENING = ["--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--log-opt", "max-size=10m",
             "--log-opt", "max-file=3"]
READ_ONLY = ["--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=256m"]
COPY_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID"]  # cp -a of the seed (src/docker/environment.rs)


class BenchError(Exception):
    """A step that failed: the bench stops, cleans up and exits 1."""


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    runs: int
    burst: int
    redeploys: int
    load_rate: int
    scale: int
    scale_parallel: int
    scale_budget: int
    mem_reserve_mb: int
    intake_rate: int
    intake_seconds: int
    flood_seconds: int
    env_idle: float
    upload_mib: int
    timeout: float
    fixture: Path
    logs: str
    only: tuple
    command: str  # how it was called, for BENCHMARKS.md

    @classmethod
    def from_env(cls, argv, env):
        def number(name, default):
            raw = env.get(name, "")
            try:
                return int(raw) if raw else default
            except ValueError:
                raise BenchError(f"{name}={raw!r} is not a whole number") from None

        runs = int(argv[0]) if argv and argv[0].isdigit() else number("BENCH_RUNS", 10)
        if argv and not argv[0].isdigit() or len(argv) > 1 or runs < 1:
            raise BenchError("usage: scripts/bench.py [RUNS]   (RUNS a whole number, at least 1)")
        only = tuple(s.strip() for s in env.get("BENCH_ONLY", "").split(",") if s.strip()) or SECTIONS
        unknown = [s for s in only if s not in SECTIONS]
        if unknown:
            raise BenchError(f"BENCH_ONLY: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        if "intake" in only and "webhooks" not in only:
            only += ("webhooks",)  # intake's deliveries are for the webhooks' previews
        overrides = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if re.fullmatch(r"BENCH_[A-Z_]+", k))
        return cls(
            runs=runs,
            burst=number("BENCH_BURST", 50),
            redeploys=number("BENCH_REDEPLOYS", 20),
            load_rate=number("BENCH_LOAD_RATE", 100),
            scale=number("BENCH_SCALE", 500),
            scale_parallel=number("BENCH_SCALE_PARALLEL", 8),
            scale_budget=number("BENCH_SCALE_BUDGET", 1800),
            mem_reserve_mb=number("BENCH_MEM_RESERVE_MB", 2048),
            intake_rate=number("BENCH_INTAKE_RATE", 500),
            intake_seconds=number("BENCH_INTAKE_SECONDS", 20),
            flood_seconds=number("BENCH_FLOOD_SECONDS", 10),
            env_idle=number("BENCH_ENV_IDLE", 10),
            upload_mib=number("BENCH_UPLOAD_MIB", 200),
            timeout=number("BENCH_TIMEOUT", 120),
            fixture=Path(env.get("BENCH_FIXTURE") or ROOT / "tests/fixtures/github-webhooks/pull_request.opened.json"),
            logs=env.get("BENCH_LOGS", ""),
            only=tuple(s for s in SECTIONS if s in only),
            command=f"{overrides + ' ' if overrides else ''}scripts/bench.py {runs}",
        )


# --------------------------------------------------------------------------------------------
# Small helpers: numbers, commands, HTTP


def median(values):
    return statistics.median(values) if values else 0.0


def ratio(a, b):
    return f"{a / b:.2f}" if b > 0 else "-"


def spread(values, fmt="{:.2f}"):
    """`median s (min–max)` of seconds."""
    if not values:
        return "not measured"
    return f"{fmt.format(median(values))} s ({fmt.format(min(values))}–{fmt.format(max(values))})"


def run(args, *, check=True, timeout=None, stdin=None, env=None):
    """Runs a command; its stdout (text). Raises BenchError with its stderr when it fails."""
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{' '.join(args[:4])} did not end within {timeout} s") from None
    if check and done.returncode != 0:
        raise BenchError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout


def docker(*args, check=True, timeout=None):
    return run(["docker", *args], check=check, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel(function, items, workers):
    """Calls function(item) for each item on `workers` threads; the results, in order. The main
    thread waits in short slices, so a signal reaches it (and the cleanup) at once."""
    items = list(items)
    if not items:
        return []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(function, item) for item in items]
        while not all(f.done() for f in futures):
            concurrent.futures.wait(futures, timeout=0.2)
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def request(port, method, path, *, host=None, body=None, headers=None, timeout=10.0):
    """One HTTP request to 127.0.0.1:port: (status, body bytes). Connection errors raise OSError."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        all_headers = dict(headers or {})
        if host:
            all_headers["Host"] = host
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def status_of(port, path, host, timeout=5.0):
    """The status of a GET, 0 when there was no answer."""
    try:
        return request(port, "GET", path, host=host, timeout=timeout)[0]
    except (OSError, http.client.HTTPException):
        return 0


def wait_until(check, timeout, what, pause=0.01):
    """Polls check() until it is true; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise BenchError(f"{what} not within {timeout:.0f} s")
        time.sleep(pause)


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over Docker's unix socket."""

    def __init__(self, path, timeout=60.0):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def docker_socket():
    host = os.environ.get("DOCKER_HOST", "")
    return host[len("unix://"):] if host.startswith("unix://") else "/var/run/docker.sock"


def docker_api(method, path, query=None):
    """A call to the Docker Engine API: (status, body)."""
    conn = UnixHTTPConnection(docker_socket())
    try:
        conn.request(method, path + ("?" + urllib.parse.urlencode(query) if query else ""))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def proc_kb(pid, key):
    """VmRSS or VmHWM of a process, in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_available_mb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def mib(text):
    """A size as docker prints it ("12.5MiB", "980kB") in MiB."""
    m = re.fullmatch(r"([\d.]+)\s*([kKMGT]?i?B)", text.strip())
    if not m:
        return 0.0
    factors = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
               "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    return float(m.group(1)) * factors.get(m.group(2), 1) / 1024**2


# --------------------------------------------------------------------------------------------
# The floor's nginx, configured like previewd's managed one


class FloorNginx:
    def __init__(self, work, port):
        self.dir, self.port = work / "floor", port
        (self.dir / "sites").mkdir(parents=True)
        (self.dir / "tmp").mkdir()
        d = self.dir
        (d / "nginx.conf").write_text(f"""pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/b; proxy_temp_path {d}/tmp/p;
  fastcgi_temp_path {d}/tmp/f; uwsgi_temp_path {d}/tmp/u; scgi_temp_path {d}/tmp/s;
  server_names_hash_bucket_size 256;
  server {{ listen 127.0.0.1:{port} default_server; return 404; }}
  include {d}/sites/*.conf;
}}
""")

    def nginx(self, *args):
        run(["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log"), *args])

    def start(self):
        self.nginx()

    def reload(self):
        self.nginx("-s", "reload")

    def route(self, name, upstream_port):
        """The floor's vhost for `name`: one server block, as a person would write it."""
        (self.dir / "sites" / f"{name}.conf").write_text(
            f"server {{ listen 127.0.0.1:{self.port}; server_name {name}.{FLOOR_DOMAIN}; "
            f"location / {{ proxy_pass http://127.0.0.1:{upstream_port}; }} }}\n")

    def unroute(self, name):
        (self.dir / "sites" / f"{name}.conf").unlink(missing_ok=True)

    def clear(self):
        for path in (self.dir / "sites").glob("*.conf"):
            path.unlink()

    def pid(self):
        try:
            return int((self.dir / "nginx.pid").read_text())
        except (OSError, ValueError):
            return 0

    def stop(self):
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGQUIT)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# The fake GitHub API: examples/fake_github.rs (tests/common/github.rs)


class FakeGitHub:
    def __init__(self, binary, work, pulls_dir, timeout):
        self.log = open(work / "github.log", "wb")
        port_file = work / "github.port"
        self.proc = subprocess.Popen(
            [str(binary), str(port_file), GITHUB_TOKEN, REPO_OWNER, str(pulls_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)

        def started():
            if self.proc.poll() is not None:
                raise BenchError(f"the fake GitHub API exited: {(work / 'github.log').read_text()[-500:]}")
            return port_file.exists()

        wait_until(started, timeout, "the fake GitHub API listening", pause=0.05)
        self.port = int(port_file.read_text())
        self.lock = threading.Lock()

    def command(self, line):
        """One command on its stdin (see examples/fake_github.rs): its answer, parsed."""
        with self.lock:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        if not answer:
            raise BenchError("the fake GitHub API exited (see github.log)")
        answer = json.loads(answer)
        if "error" in answer:
            raise BenchError(f"the fake GitHub API: {line.split()[0]}: {answer['error']}")
        return answer

    def summary(self):
        """What previewd posted so far: calls, comments, deployments, statuses by state, and the
        tarballs its codeload served."""
        return self.command("summary")

    def set_pull(self, payload_file):
        """GitHub holds the pull request of this payload from now on (as after a push)."""
        self.command(f"pull {payload_file}")

    def set_commit(self, repo, sha, tree):
        """The files of the directory `tree` are commit `sha` of `repo` from now on."""
        self.command(f"commit {repo} {sha} {tree}")

    def stop(self):
        """Closing stdin ends it (it prints its calls to the log first)."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------------------------
# The bench: previewd and everything around it


@dataclass
class HandEnv:
    """An environment made by hand: what to remove again."""
    name: str
    network: str
    volume: str
    containers: dict = field(default_factory=dict)  # part -> container id


class Bench:
    def __init__(self, settings):
        self.s = settings
        self.work = Path(tempfile.mkdtemp(prefix="previewd-bench."))
        self.instance = f"bench{random.randrange(10**6)}"
        self.nginx_port, self.api_port, self.floor_port = free_port(), free_port(), free_port()
        self.target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
        if not self.target.is_absolute():
            self.target = ROOT / self.target
        self.previewd_bin = self.target / "release/previewd"
        self.daemon = None
        self.github = None
        self.children = []  # wrk and load generators still running
        self.floor = FloorNginx(self.work, self.floor_port)
        self.floor_images = []  # what the floor built: removed again at the end
        self.secret = secrets.token_hex(20)
        self.auth = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.r = {}  # results, by figure

    # --- setup -----------------------------------------------------------------------------

    def prepare(self):
        if not self.s.fixture.is_file():
            raise BenchError(f"no webhook fixture at {self.s.fixture} (set BENCH_FIXTURE)")
        install_missing_tools(self.s.only)
        log("scripts/setup.sh (images, seed volume; PREVIEWD_SKIP_BUILD=1)")
        subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env={**os.environ, "PREVIEWD_SKIP_BUILD": "1"},
                       check=True)
        log(f"cargo build --release --bin previewd --example fake_github (target {self.target})")
        subprocess.run([cargo(), "build", "--release", "--bin", "previewd", "--example", "fake_github"], cwd=ROOT,
                       check=True)
        self.make_deliveries()
        self.github = FakeGitHub(self.target / "release/examples/fake_github", self.work, self.work / "hooks",
                                 self.s.timeout)
        (self.work / "webhook.secret").write_text(self.secret + "\n")
        (self.work / "github.token").write_text(GITHUB_TOKEN + "\n")
        (self.work / "config.yml").write_text(self.config_yaml())
        self.floor.start()
        self.start_daemon()
        time.sleep(1)
        self.r["rss_idle"] = self.rss_kb()

    def config_yaml(self):
        password_hash = run([str(self.previewd_bin), "hash-password"], stdin=PASSWORD).strip()
        shop = shop_image_yaml() if "environments" in self.s.only else ""
        builds = "builds" in self.s.only
        # The image builds are for: no command, so the Dockerfile's CMD runs (tests/builds.rs).
        web = f"\n  web: {{image: {IMAGE}, port: 3000, pull: never}}" if builds else ""
        build_repo = (f'\n    {REPO_OWNER}/{BUILD_REPO_NAME}: {{image: web, name: "{{{{ repo }}}}-pr-'
                      f'{{{{ number }}}}", build: {{context: .}}}}' if builds else "")
        return f"""instance: {self.instance}
listen: 127.0.0.1:{self.api_port}
base_domain: {BASE_DOMAIN}
public_url: "http://{{host}}:{self.nginx_port}"
state_dir: {self.work}/state
nginx:
  listen: 127.0.0.1:{self.nginx_port}
  template: {ROOT}/templates/vhost.conf.tera
images:
  demo: {{image: {IMAGE}, port: 3000, command: [/bin/busybox, httpd, -f, -p, "3000", -h, /www], pull: never}}{shop}{web}
users: [{{name: {USER}, password_hash: "{password_hash}"}}]
# The bench launches hundreds of previews as one user, and its bursts all at once, as the floor
# does: the limits that protect a shared host would measure the queue instead.
limits: {{max_previews: 100000, max_previews_per_user: 100000, parallel_launches: 1000}}
github:
  api_url: http://127.0.0.1:{self.github.port}
  webhook_secret_file: {self.work}/webhook.secret
  token_file: {self.work}/github.token
  # Off: the fake lists no open pull requests, so a sync would remove the webhook previews.
  sync_interval: 0
  repos:
    {REPO_OWNER}/{REPO_NAME}: {{image: demo, name: "{{{{ repo }}}}-pr-{{{{ number }}}}"}}{build_repo}
"""

    def make_deliveries(self):
        """hooks/<n>.json (a signed pull_request "opened" per PR: the fake GitHub answers their
        pull requests too) and hooks/items.tsv (signature TAB body, for wrk)."""
        hooks = self.work / "hooks"
        hooks.mkdir()
        fixture = json.loads(self.s.fixture.read_text())
        at = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        items = []
        for n in self.pr_numbers():
            body = delivery_body(fixture, n, hashlib.sha1(f"{self.instance}-{n}".encode()).hexdigest(), at)
            (hooks / f"{n}.json").write_bytes(body)
            items.append(f"{sign(self.secret, body)}\t{body.decode()}\n")
        (hooks / "items.tsv").write_text("".join(items))

    def pr_numbers(self):
        return range(FIRST_PR, FIRST_PR + self.s.burst)

    # --- previewd ---------------------------------------------------------------------------

    def start_daemon(self, timeout=None):
        """Starts previewd; returns once /healthz says ok."""
        timeout = timeout or self.s.timeout
        with open(self.work / "previewd.log", "ab") as out:
            self.daemon = subprocess.Popen(
                [str(self.previewd_bin), "serve", "--config", str(self.work / "config.yml"), "--log-format", "json"],
                stdout=out, stderr=out, start_new_session=True)

        def healthy():
            if self.daemon.poll() is not None:
                tail = (self.work / "previewd.log").read_text().splitlines()[-5:]
                self.daemon = None
                raise BenchError("previewd exited: " + "\n".join(tail))
            try:
                return b'"status":"ok"' in request(self.api_port, "GET", "/healthz", timeout=30)[1]
            except (OSError, http.client.HTTPException):
                return False

        wait_until(healthy, timeout, "previewd healthy", pause=0.02)

    def stop_daemon(self):
        """SIGTERM, then SIGKILL if previewd has not stopped within the timeout."""
        if self.daemon is None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(timeout=self.s.timeout)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            log(f"previewd did not stop within {self.s.timeout:.0f}s: killed")
        self.daemon = None

    def rss_kb(self):
        return proc_kb(self.daemon.pid, "VmRSS") if self.daemon else 0

    def hwm_kb(self):
        return proc_kb(self.daemon.pid, "VmHWM") if self.daemon else 0

    def api(self, method, path, fields=None, accept=None, timeout=None):
        headers = {"Authorization": self.auth}
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if accept:
            headers["Accept"] = accept
        return request(self.api_port, method, path, body=body, headers=headers, timeout=timeout or self.s.timeout)

    def launch(self, name, image="demo"):
        status, body = self.api("POST", "/launch", {"image_name": image, "container_name": name})
        if status != 200:
            raise BenchError(f"the launch of {name} answered {status}: {body[:300]!r}")

    def kill_preview(self, name):
        status, body = self.api("POST", "/kill", {"container_name": name})
        if status != 200:
            raise BenchError(f"the kill of {name} answered {status}: {body[:300]!r}")

    def kill_quietly(self, name):
        try:
            self.api("POST", "/kill", {"container_name": name})
        except (OSError, http.client.HTTPException) as err:
            log(f"the kill of {name} failed: {err}")

    def metric(self, series):
        """The value of an exact series, e.g. 'previewd_kills_total{result="success"}'; 0 when absent."""
        body = request(self.api_port, "GET", "/metrics", timeout=30)[1].decode()
        value = 0.0
        for line in body.splitlines():
            name, _, rest = line.partition(" ")
            if name == series:
                value = float(rest.split()[0])
        return value

    def reloads(self):
        return json.loads(request(self.api_port, "GET", "/healthz", timeout=10)[1])["nginx_reloads"]

    def log_count(self, message):
        needle = f'"message":"{message}"'
        with open(self.work / "previewd.log", errors="replace") as f:
            return sum(needle in line for line in f)

    def previewd_log_events(self):
        """previewd's JSON log lines, parsed (others skipped)."""
        with open(self.work / "previewd.log", errors="replace") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    # --- serving ----------------------------------------------------------------------------

    def wait_200(self, host, port):
        """Polls http://host:port/ through nginx until it answers 200."""
        wait_until(lambda: status_of(port, "/", f"{host}:{port}") == 200, self.s.timeout, f"{host} answering 200")

    def wait_preview(self, name):
        self.wait_200(f"{name}.{BASE_DOMAIN}", self.nginx_port)

    def floor_run(self, image=IMAGE, command=tuple(DEMO_COMMAND)):
        """docker run -d with a port published on 127.0.0.1: (container id, port)."""
        cid = docker("run", "-d", "--label", f"bench.floor={self.instance}", "-p", "127.0.0.1::3000", image,
                     *command).strip()
        return cid, int(docker("port", cid, "3000/tcp").splitlines()[0].rsplit(":", 1)[1])

    def floor_launch(self, name, image=IMAGE, command=tuple(DEMO_COMMAND)):
        """The floor: docker run, one vhost, nginx -s reload, poll until 200. The container's id."""
        cid, port = self.floor_run(image, command)
        self.floor.route(name, port)
        self.floor.reload()
        self.wait_200(f"{name}.{FLOOR_DOMAIN}", self.floor_port)
        return cid

    def floor_replace(self, name, image, old, served):
        """The floor's redeploy: docker run of the new image, the vhost to its port, nginx -s
        reload, poll until served(port, host), docker rm -f of the old container. The new id."""
        cid, port = self.floor_run(image, ())
        self.floor.route(name, port)
        self.floor.reload()
        host = f"{name}.{FLOOR_DOMAIN}:{self.floor_port}"
        wait_until(lambda: served(self.floor_port, host), self.s.timeout, f"{name}'s new container (floor)")
        docker("rm", "-f", old)
        return cid

    def floor_build(self, context_dir, tag):
        """The floor's build: the classic builder, as previewd's (`DOCKER_BUILDKIT=0 docker
        build`). Its output."""
        self.floor_images.append(tag)
        return run(["docker", "build", "-t", tag, str(context_dir)], env={"DOCKER_BUILDKIT": "0"},
                   timeout=max(self.s.timeout, 300))

    def remove_floor_images(self, tags):
        docker("rmi", *tags)
        self.floor_images = [tag for tag in self.floor_images if tag not in tags]

    def floor_burst(self, prefix, count):
        """count floor launches at once; failures are ignored, as the wall time is what counts."""
        def one(i):
            try:
                self.floor_launch(f"{prefix}-{i}")
            except BenchError:
                pass
        parallel(one, range(1, count + 1), count)

    def clear(self):
        """From nothing: every preview killed through the API, the floor's containers removed."""
        status, body = self.api("GET", "/api/previews", timeout=60)
        names = [p["name"] for p in json.loads(body)] if status == 200 else []
        parallel(self.kill_quietly, names, 8)
        remove_labelled("label", f"bench.floor={self.instance}")
        self.floor.clear()
        self.floor.reload()
        time.sleep(1)

    # --- cleanup ----------------------------------------------------------------------------

    def cleanup(self):
        """Removes everything the bench started; each step on its own, so one failing does not
        keep the others from running."""
        steps = [
            self.stop_children,
            self.stop_daemon,
            lambda: self.github and self.github.stop(),
            lambda: remove_labelled("label", f"previewd.instance={self.instance}"),
            lambda: remove_labelled("label", f"bench.floor={self.instance}"),
            self.remove_images,
            self.stop_managed_nginx,
            self.floor.stop,
            self.keep_logs,
            lambda: shutil.rmtree(self.work, ignore_errors=True),
        ]
        for step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - the next steps must run whatever this one did
                log(f"cleanup: {err}")

    def remove_images(self):
        """The images previewd built (its instance label) and those the floor built."""
        ids = docker("images", "-q", "--filter", f"label=previewd.instance={self.instance}", check=False).split()
        ids += docker("images", "-q", f"bench-{self.instance}/*", check=False).split()
        if ids or self.floor_images:
            docker("rmi", "-f", *dict.fromkeys(ids + self.floor_images), check=False)

    def stop_children(self):
        for child in self.children:
            if child.poll() is None:
                # wrk prints its summary on SIGINT; the load generators just stop on SIGTERM.
                child.send_signal(signal.SIGINT if child.args[0] == "wrk" else signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children = []

    def stop_managed_nginx(self):
        pid_file = self.work / "state/nginx/nginx.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGQUIT)
            except (OSError, ValueError):
                pass

    def keep_logs(self):
        if not self.s.logs:
            return
        Path(self.s.logs).mkdir(parents=True, exist_ok=True)
        for path in list(self.work.glob("*.log")) + list(self.work.glob("*.txt")):
            shutil.copy(path, self.s.logs)


def remove_labelled(kind, label):
    """Removes the containers, then the networks and volumes, carrying a label of our own."""
    ids = docker("ps", "-aq", "--filter", f"{kind}={label}", check=False).split()
    parallel(lambda batch: docker("rm", "-f", *batch, check=False), [ids[i:i + 50] for i in range(0, len(ids), 50)], 4)
    networks = docker("network", "ls", "-q", "--filter", f"{kind}={label}", check=False).split()
    if networks:
        docker("network", "rm", *networks, check=False)
    volumes = docker("volume", "ls", "-q", "--filter", f"{kind}={label}", check=False).split()
    if volumes:
        docker("volume", "rm", *volumes, check=False)


def cargo():
    found = shutil.which("cargo") or str(Path.home() / ".cargo/bin/cargo")
    if not os.access(found, os.X_OK):
        raise BenchError("cargo not found (PATH or ~/.cargo/bin)")
    return found


def install_missing_tools(sections):
    """wrk (the webhook intake) from Debian when missing; nginx and docker come with setup.sh."""
    if "intake" in sections and not shutil.which("wrk"):
        log("installing wrk")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], env=env, check=True, stdout=subprocess.DEVNULL)


# --------------------------------------------------------------------------------------------
# Webhook deliveries


def delivery_body(fixture, number, sha, at, repo_name=REPO_NAME, action="opened"):
    """GitHub's example pull_request "opened" payload for PR `number` of the bench's repository
    (or of `repo_name`), with another action if asked."""
    payload = json.loads(json.dumps(fixture))
    ref = f"bench/pr-{number}"
    payload["action"] = action
    payload["number"] = number
    pr = payload["pull_request"]
    pr["number"] = number
    pr["head"].update(sha=sha, ref=ref, label=f"{REPO_OWNER}:{ref}")
    pr["updated_at"] = at
    for repo in (payload["repository"], pr["head"]["repo"], pr["base"]["repo"]):
        repo["full_name"] = f"{REPO_OWNER}/{repo_name}"
        repo["name"] = repo_name
        repo["owner"]["login"] = REPO_OWNER
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret, body):
    """Hex HMAC-SHA256 of the body, as in X-Hub-Signature-256."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(b, number):
    """PR `number`'s signed delivery with a new delivery id, as GitHub sends it: (status, seconds)."""
    return deliver_body(b, (b.work / "hooks" / f"{number}.json").read_bytes())


def deliver_body(b, body):
    """A signed pull_request delivery of this body with a new delivery id: (status, seconds)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/bench",
        "X-GitHub-Event": "pull_request",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": "sha256=" + sign(b.secret, body),
    }
    began = time.monotonic()
    try:
        status = request(b.api_port, "POST", "/webhooks/github", body=body, headers=headers, timeout=b.s.timeout)[0]
    except (OSError, http.client.HTTPException):
        status = 0
    return status, time.monotonic() - began


# wrk has no rate option (and Debian has no wrk2): delay() spaces each thread's requests on a
# monotonic clock (LuaJIT's ffi); a rate of 0 sends as fast as the connections allow. Every
# request gets its own X-GitHub-Delivery (previewd drops redeliveries): the signature covers only
# the body, so the precomputed one stays valid. done() prints how many got the expected status.
DELIVERIES_LUA = r"""
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
"""


def run_wrk(b, seconds, rate, expected, items, output):
    """wrk POSTing signed deliveries for `seconds`; its output goes to `output`."""
    lua = b.work / "deliveries.lua"
    lua.write_text(DELIVERIES_LUA)
    args = ["wrk", "-t", "2", "-c", "50", "-d", f"{seconds}s", "--timeout", "10s", "--latency", "-s", str(lua),
            f"http://127.0.0.1:{b.api_port}", "--", str(items), str(rate), "2", str(expected), secrets.token_hex(4)]
    with open(output, "w") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        b.children.append(child)
        while child.poll() is None:
            time.sleep(0.1)
        b.children.remove(child)


def wrk_ms(value):
    for suffix, factor in (("us", 0.001), ("ms", 1.0), ("m", 60000.0), ("s", 1000.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def parse_wrk(path):
    """wrk --latency output: rate, p50_ms, p99_ms, requests, socket_errors, expected, others."""
    out = {"rate": 0.0, "p50": 0.0, "p99": 0.0, "requests": 0, "socket": 0, "good": 0, "others": []}
    for line in Path(path).read_text(errors="replace").splitlines():
        words = line.split()
        if "requests in" in line:
            out["requests"] = int(words[0])
        elif "Socket errors" in line:
            out["socket"] = sum(int(n) for n in re.findall(r"\d+", line))
        elif words[:1] == ["Requests/sec:"]:
            out["rate"] = float(words[1])
        elif words[:1] == ["50%"]:
            out["p50"] = wrk_ms(words[1])
        elif words[:1] == ["99%"]:
            out["p99"] = wrk_ms(words[1])
        elif words[:1] == ["bench-statuses"]:
            out["good"], out["others"] = int(words[1]), words[3:]
    return out


# --------------------------------------------------------------------------------------------
# Sections 1-3: launches, bursts, redeploys under load


def bench_launch(b):
    log(f"1. launch latency, {b.s.runs} runs each")
    p, f = [], []
    for i in range(1, b.s.runs + 1):
        t = time.monotonic()
        b.launch(f"lat-{i}")
        b.wait_preview(f"lat-{i}")
        p.append(time.monotonic() - t)
        t = time.monotonic()
        b.floor_launch(f"lat-{i}")
        f.append(time.monotonic() - t)
    b.r.update(p_lat=median(p), f_lat=median(f))


def bench_burst(b):
    log(f"2. burst of {b.s.burst} launches")
    before = b.reloads()
    t = time.monotonic()
    parallel(lambda i: b.api("POST", "/launch", {"image_name": "demo", "container_name": f"burst-{i}"}),
             range(1, b.s.burst + 1), b.s.burst)
    for i in range(1, b.s.burst + 1):
        b.wait_preview(f"burst-{i}")
    b.r["p_burst"] = time.monotonic() - t
    b.r["burst_reloads"] = b.reloads() - before
    t = time.monotonic()
    b.floor_burst("burst", b.s.burst)
    b.r["f_burst"] = time.monotonic() - t
    b.r.update(rss_burst=b.rss_kb(), rss_peak=b.hwm_kb())


def start_load(b, mode, seconds, output):
    """Paced GETs of the steady preview through nginx (scripts/bench-load.py), in the background."""
    out = open(output, "w")
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/bench-load.py"), f"steady.{BASE_DOMAIN}", str(b.nginx_port),
         str(b.s.load_rate), str(seconds), mode, str(b.work / "stop-load")],
        stdout=out, start_new_session=True)
    out.close()
    b.children.append(child)
    return child


def wait_children(b, children):
    for child in children:
        while child.poll() is None:
            time.sleep(0.1)
        b.children.remove(child)


def load_fields(path):
    """bench-load.py's line `requests=N ok=N ...` as a dict."""
    return dict(word.split("=", 1) for word in Path(path).read_text().split() if "=" in word)


def bench_redeploy(b):
    log(f"3. {b.s.redeploys} redeploys under load, and the same load without them")
    b.launch("steady")
    stop = b.work / "stop-load"
    stop.unlink(missing_ok=True)
    t = time.monotonic()
    loads = [start_load(b, mode, 600, b.work / f"load-{mode}.txt") for mode in ("keepalive", "fresh")]
    time.sleep(1)
    for _ in range(b.s.redeploys):
        b.launch("steady")
    time.sleep(1)
    stop.touch()
    wait_children(b, loads)
    seconds = int(time.monotonic() - t + 0.5)
    stop.unlink()
    wait_children(b, [start_load(b, mode, seconds, b.work / f"base-{mode}.txt") for mode in ("keepalive", "fresh")])
    for kind in ("load", "base"):
        for mode in ("keepalive", "fresh"):
            b.r[f"{kind}_{mode}"] = load_fields(b.work / f"{kind}-{mode}.txt")


# --------------------------------------------------------------------------------------------
# Sections 4-5: webhooks


def bench_webhooks(b):
    log(f"4. {b.s.burst} signed pull_request webhooks at once")
    before = b.reloads()
    t = time.monotonic()
    answers = parallel(lambda n: deliver(b, n), b.pr_numbers(), b.s.burst)
    accepted = sum(status == 202 for status, _ in answers)
    if accepted != b.s.burst:
        counts = {}
        for status, _ in answers:
            counts[status] = counts.get(status, 0) + 1
        log(f"only {accepted} of {b.s.burst} deliveries answered 202: {counts}")
    for n in b.pr_numbers():
        b.wait_preview(f"{REPO_NAME}-pr-{n}")
    b.r["p_hooks"] = time.monotonic() - t
    b.r["hook_reloads"] = b.reloads() - before
    t = time.monotonic()
    b.floor_burst("hook", b.s.burst)
    b.r["f_hooks"] = time.monotonic() - t
    # Feedback runs in the background: wait (bounded) for every PR's "success" status.
    deadline = time.monotonic() + b.s.timeout
    while b.github.summary()["statuses"].get("success", 0) < b.s.burst and time.monotonic() < deadline:
        time.sleep(0.2)
    summary = b.github.summary()
    b.r.update(hook_202=accepted, hook_slowest=max((s for _, s in answers), default=0.0),
               hook_success=summary["statuses"].get("success", 0), hook_comments=summary["comments"],
               hook_api_errors=int(b.metric('previewd_github_api_calls_total{result="failure"}')))


def bench_intake(b):
    log(f"5. webhook intake: {b.s.intake_rate} deliveries/s for {b.s.intake_seconds}s, "
        f"then bad signatures for {b.s.flood_seconds}s")
    accepted_series = 'previewd_webhook_deliveries_total{event="pull_request",outcome="accepted"}'
    check = "preview already runs the head commit"
    accepted0, launches0, checks0 = b.metric(accepted_series), launch_count(b), b.log_count(check)
    run_wrk(b, b.s.intake_seconds, b.s.intake_rate, 202, b.work / "hooks/items.tsv", b.work / "intake.txt")
    t = time.monotonic()
    intake = parse_wrk(b.work / "intake.txt")
    accepted = int(b.metric(accepted_series) - accepted0)
    # Accepted deliveries queue runs that check the preview runs the delivered commit; a pull
    # request has at most one run waiting, which reads its newest state.
    deadline = time.monotonic() + b.s.timeout
    while b.metric("previewd_pull_request_runs") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    runs = b.log_count(check) - checks0
    if b.metric("previewd_pull_request_runs") == 0:
        drain = f"{time.monotonic() - t:.1f} s after the last delivery ({runs} runs for {accepted} accepted deliveries)"
    else:
        drain = f"not within {b.s.timeout:.0f} s of the last delivery ({runs} runs done)"
    b.r.update(intake=intake, intake_drain=drain, intake_launches=int(launch_count(b) - launches0))

    rejected_series = 'previewd_webhook_deliveries_total{event="unverified",outcome="rejected"}'
    rejected0 = b.metric(rejected_series)
    body = (b.work / "hooks" / f"{FIRST_PR}.json").read_bytes()
    (b.work / "hooks/bad.tsv").write_text(f"{sign('not-the-secret', body)}\t{body.decode()}\n")
    run_wrk(b, b.s.flood_seconds, 0, 401, b.work / "hooks/bad.tsv", b.work / "flood.txt")
    b.r.update(flood=parse_wrk(b.work / "flood.txt"), flood_rejected=int(b.metric(rejected_series) - rejected0))


def launch_count(b):
    return b.metric('previewd_launches_total{result="success"}') + b.metric('previewd_redeploys_total{result="success"}')


# --------------------------------------------------------------------------------------------
# Section 6: whole environments


def shop_image_yaml():
    """images.shop: the shop environment of tests/environments.rs (shop_yaml)."""
    return """
  shop:
    image: previewd-shop:demo
    port: 5000
    health_path: /healthz
    health_timeout: 30
    pull: never
    read_only: true
    env:
      DATABASE_URL: "postgres://app:app@db:5432/app"
      REDIS_URL: "redis://cache:6379/0"
      API_URL: "http://api-{{ slug }}.{{ base_domain }}"
    services:
      db:
        image: previewd-postgres:15
        pull: never
        env: {POSTGRES_USER: app, POSTGRES_PASSWORD: app, POSTGRES_DB: app}
        ready: {command: [pg_isready, -h, 127.0.0.1, -U, app, -d, app]}
        ready_timeout: 60
        data: /var/lib/postgresql/data
        seed_volume: shop-db-seed
        cap_add: [SETUID, SETGID]
        memory: 512m
      cache:
        image: previewd-redis:7
        pull: never
        ready: {tcp: 6379}
    jobs:
      - name: migrate
        command: [python3, migrate.py]
        timeout: 60"""


def shop_served(port, host):
    """Whether the shop's /api/state answers 200 with every seeded product and the migration."""
    try:
        status, body = request(port, "GET", "/api/state", host=host, timeout=5)
        state = json.loads(body) if status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return False
    return state.get("products") == SHOP_PRODUCTS and state.get("migrated") is True


def launch_with_steps(b, name):
    """POST /launch of the shop, streamed as NDJSON: {step: seconds} (a step that comes again,
    like a second job, adds up). The last step ends when the answer has arrived."""
    began = time.monotonic()
    status, body = b.api("POST", "/launch", {"image_name": "shop", "container_name": name},
                         accept="application/x-ndjson", timeout=max(b.s.timeout, 300))
    total_ms = (time.monotonic() - began) * 1000
    events = [json.loads(line) for line in body.splitlines() if line.strip()]
    if status != 200 or not events or events[-1].get("step") != "ready":
        raise BenchError(f"the launch of {name} failed ({status}): {body[-500:]!r}")
    timed = [e for e in events if "elapsed_ms" in e]
    ends = [e["elapsed_ms"] for e in timed[1:]] + [total_ms]
    steps = {}
    for event, end in zip(timed, ends):
        steps[event["step"]] = steps.get(event["step"], 0.0) + (end - event["elapsed_ms"]) / 1000
    return steps


def previewd_env_launch(b, name):
    """previewd's launch of the shop until /api/state through nginx shows the seed and the migration."""
    t = time.monotonic()
    steps = launch_with_steps(b, name)
    answered = time.monotonic()
    host = f"{name}.{BASE_DOMAIN}:{b.nginx_port}"
    wait_until(lambda: shop_served(b.nginx_port, host), b.s.timeout, f"{name}'s /api/state")
    steps["answer to served"] = time.monotonic() - answered
    return time.monotonic() - t, steps


def previewd_parts(b, name):
    """The running containers of a preview: {app|db|cache: id}."""
    out = docker("ps", "--no-trunc", "--filter", f"label=previewd.instance={b.instance}",
                 "--filter", f"label=previewd.slug={name}",
                 "--format", '{{.ID}} {{.Label "previewd.role"}} {{.Label "previewd.part"}}')
    parts = {}
    for line in out.splitlines():
        cid, role, *part = line.split()
        parts[part[0] if role == "service" and part else role] = cid
    return parts


def hand_env_launch(b, name):
    """The shop by hand with the docker CLI, step by step as a script would do it, with previewd's
    hardening: (seconds, {step: seconds}, HandEnv)."""
    label = ["--label", f"bench.floor={b.instance}"]
    env = HandEnv(name, network=f"bench-{b.instance}-{name}", volume=f"bench-{b.instance}-{name}-db")
    steps = {}
    began = time.monotonic()

    def step(what, action):
        t = time.monotonic()
        action()
        steps[what] = steps.get(what, 0.0) + time.monotonic() - t

    def env_args(values):
        return [arg for key, value in values.items() for arg in ("-e", f"{key}={value}")]

    app_env = env_args({**SHOP_ENV, "API_URL": f"http://api-{name}.{BASE_DOMAIN}", "PREVIEW_NAME": name})
    step("network", lambda: docker("network", "create", *label, env.network))

    def seed():
        docker("volume", "create", *label, env.volume)
        docker("run", "--rm", *label, "--network", "none", "--cap-drop", "ALL",
               *[arg for cap in COPY_CAPS for arg in ("--cap-add", cap)], "--security-opt", "no-new-privileges",
               "--memory", "1g", "--pids-limit", "64", "-u", "0:0", "--entrypoint", "cp",
               "-v", f"{SEED_VOLUME}:/seed:ro", "-v", f"{env.volume}:/data", POSTGRES_IMAGE, "-a", "/seed/.", "/data/")
    step("volume + seed copy", seed)

    def services():
        env.containers["db"] = docker(
            "run", "-d", *label, "--network", env.network, "--network-alias", "db", *HARDENING,
            "--cap-add", "SETUID", "--cap-add", "SETGID", "--memory", "512m", "--pids-limit", "512",
            *env_args(POSTGRES_ENV), "-v", f"{env.volume}:/var/lib/postgresql/data", POSTGRES_IMAGE).strip()
        env.containers["cache"] = docker(
            "run", "-d", *label, "--network", env.network, "--network-alias", "cache", *HARDENING,
            "--memory", "1g", "--pids-limit", "512", REDIS_IMAGE).strip()
    step("db + cache run", services)
    step("ready", lambda: wait_services_by_hand(b, env))
    step("migrate", lambda: docker(
        "run", "--rm", *label, "--network", env.network, *HARDENING, *READ_ONLY, "--memory", "1g",
        "--pids-limit", "512", *app_env, SHOP_IMAGE, "python3", "migrate.py"))
    port = free_port()

    def app():
        env.containers["app"] = docker(
            "run", "-d", *label, "--network", env.network, "-p", f"127.0.0.1:{port}:5000", *HARDENING, *READ_ONLY,
            "--memory", "1g", "--pids-limit", "512", *app_env, SHOP_IMAGE).strip()
    step("app run", app)

    def route():
        b.floor.route(name, port)
        b.floor.reload()
        host = f"{name}.{FLOOR_DOMAIN}:{b.floor_port}"
        wait_until(lambda: shop_served(b.floor_port, host), b.s.timeout, f"{name}'s /api/state (by hand)")
    step("vhost + reload + served", route)
    return time.monotonic() - began, steps, env


def wait_services_by_hand(b, env):
    """pg_isready by docker exec, then Redis's port by TCP, each polled every 50 ms."""
    def pg_ready():
        return subprocess.run(["docker", "exec", env.containers["db"], *PG_READY],
                              capture_output=True).returncode == 0
    wait_until(pg_ready, b.s.timeout, "PostgreSQL ready (by hand)", pause=0.05)
    address = docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{env.network}").IPAddress}}}}',
                     env.containers["cache"]).strip()

    def redis_ready():
        try:
            socket.create_connection((address, 6379), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait_until(redis_ready, b.s.timeout, "Redis ready (by hand)", pause=0.05)


def remove_hand_env(b, env):
    """docker rm -f, the network and the volume, the vhost and a reload: seconds."""
    t = time.monotonic()
    docker("rm", "-f", *env.containers.values())
    docker("network", "rm", env.network)
    docker("volume", "rm", env.volume)
    b.floor.unroute(env.name)
    b.floor.reload()
    return time.monotonic() - t


def leftovers(b, name, network):
    """What is left of a killed preview: containers and volumes with its labels, its network, its vhost."""
    filters = ["--filter", f"label=previewd.instance={b.instance}", "--filter", f"label=previewd.slug={name}"]
    left = {
        "containers": len(docker("ps", "-aq", *filters).split()),
        "volumes": len(docker("volume", "ls", "-q", *filters).split()),
        "networks": int(bool(network) and docker("network", "inspect", network, check=False).strip() not in ("", "[]")),
        "vhosts": int((b.work / "state/nginx/sites" / f"previewd.{b.instance}.{name}.conf").exists()),
    }
    return {what: n for what, n in left.items() if n}


def memory_mib(ids):
    """docker stats' memory usage of each container, in MiB, by id."""
    out = docker("stats", "--no-stream", "--no-trunc", "--format", "{{.ID}} {{.MemUsage}}", *ids)
    usage = {}
    for line in out.splitlines():
        cid, _, rest = line.partition(" ")
        usage[cid] = mib(rest.split("/")[0])
    return usage


def env_memory(parts):
    """{app, db, cache, total} in MiB of an environment's containers ({part: id})."""
    usage = memory_mib(list(parts.values()))
    by_part = {part: next((v for cid, v in usage.items() if cid.startswith(pid) or pid.startswith(cid)), 0.0)
               for part, pid in parts.items()}
    by_part["total"] = sum(by_part.values())
    return by_part


def env_run(b, i, results):
    """One run: previewd's launch and the launch by hand (alternating which goes first), previewd's
    redeploy, both idle, their memory, both removed, and what previewd's kill left."""
    name, hand = f"env-{i}", f"hand-{i}"
    order = ("previewd", "hand") if i % 2 else ("hand", "previewd")
    hand_env = None
    for who in order:
        if who == "previewd":
            seconds, steps = previewd_env_launch(b, name)
            results["p_launch"].append(seconds)
            results["p_steps"].append(steps)
        else:
            seconds, steps, hand_env = hand_env_launch(b, hand)
            results["h_launch"].append(seconds)
            results["h_steps"].append(steps)
    parts = previewd_parts(b, name)
    services = {parts.get("db"), parts.get("cache")}
    t = time.monotonic()
    steps = launch_with_steps(b, name)
    wait_until(lambda: shop_served(b.nginx_port, f"{name}.{BASE_DOMAIN}:{b.nginx_port}"), b.s.timeout,
               f"{name}'s /api/state after the redeploy")
    results["p_redeploy"].append(time.monotonic() - t)
    results["r_steps"].append(steps)
    parts = previewd_parts(b, name)
    results["services_kept"] += services == {parts.get("db"), parts.get("cache")}
    results["migrated_again"] += "job" in steps
    time.sleep(b.s.env_idle)
    results["p_memory"].append(env_memory(parts))
    results["h_memory"].append(env_memory(hand_env.containers))
    network = docker("inspect", "-f", '{{index .Config.Labels "previewd.network"}}', parts["app"]).strip()
    t = time.monotonic()
    b.kill_preview(name)
    results["p_kill"].append(time.monotonic() - t)
    left = leftovers(b, name, network)
    if left:
        log(f"{name}: left after its kill: {left}")
    results["left"].append(left)
    results["h_kill"].append(remove_hand_env(b, hand_env))
    log(f"environments run {i}: previewd {results['p_launch'][-1]:.2f} s, by hand {results['h_launch'][-1]:.2f} s, "
        f"redeploy {results['p_redeploy'][-1]:.2f} s, idle memory {results['p_memory'][-1]['total']:.0f} MiB")


def bench_environments(b):
    log(f"6. whole environments: the shop, {b.s.runs} runs (previewd and by hand)")
    for image in (SHOP_IMAGE, POSTGRES_IMAGE, REDIS_IMAGE):
        docker("image", "inspect", image)
    docker("volume", "inspect", SEED_VOLUME)
    b.clear()
    results = {key: [] for key in ("p_launch", "h_launch", "p_steps", "h_steps", "p_redeploy", "r_steps",
                                   "p_memory", "h_memory", "p_kill", "h_kill", "left")}
    results.update(services_kept=0, migrated_again=0)
    for i in range(1, b.s.runs + 1):
        env_run(b, i, results)
    b.r["env"] = results


# --------------------------------------------------------------------------------------------
# Section 7: builds from source


def app_files(token, page):
    """The small app of the builds section, as {path: text}: its first step echoes a token of
    its own, so no other build (previewd's, the floor's, an earlier run's) has its layers; then a
    step of about a second, the site, and the command."""
    dockerfile = (f"FROM {IMAGE}\n"
                  f"RUN echo {token} > /token\n"
                  "RUN sleep 1 && echo x > /x\n"
                  "COPY site/ /www/\n"
                  f"CMD {json.dumps(DEMO_COMMAND)}\n")
    return {"Dockerfile": dockerfile, "site/index.html": f"{page}\n", "site/about.html": "about this app\n"}


def write_tree(directory, files):
    """Writes the files ({path: text}) under `directory`, made when missing; returns it."""
    for path, text in files.items():
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return directory


def tar_of(files):
    """A plain tar of the files ({path: text}), as `previewd launch --build` uploads a context."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def page_is(text):
    """A check for wait_until: whether GET / of a host through a port answers 200 with `text`."""
    def served(port, host):
        try:
            status, body = request(port, "GET", "/", host=host, timeout=5)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and body.decode(errors="replace").strip() == text
    return served


def upload_build(b, name, body):
    """POST /api/builds of a context (a tar) for the preview `name` of the image `web`; previewd
    answers once it is built and launched."""
    headers = {"Authorization": b.auth, "Content-Type": "application/x-tar", "Accept": "application/json"}
    status, answer = request(b.api_port, "POST", f"/api/builds?image=web&name={name}", body=body, headers=headers,
                             timeout=max(b.s.timeout, 300))
    if status != 200:
        raise BenchError(f"the build of {name} answered {status}: {answer[:500]!r}")


def in_background(work):
    """Runs work() in a thread; the function returned waits for it and raises what it raised."""
    outcome = {}

    def run_it():
        try:
            outcome["value"] = work()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=run_it, daemon=True)
    thread.start()

    def join():
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")
    return join


def build_log(b, name):
    status, body = b.api("GET", f"/api/previews/{name}/build-log")
    if status != 200:
        raise BenchError(f"the build log of {name} answered {status}: {body[:300]!r}")
    return body.decode(errors="replace")


def build_seconds(log_text):
    """How long previewd's build took, as the build log's last line says (`built TAG in 3.2 s`)."""
    found = re.findall(r"^previewd: built \S+ in ([\d.]+) s$", log_text, re.M)
    if not found:
        raise BenchError(f"no finished build in the build log: {log_text[-300:]!r}")
    return float(found[-1])


def engine_time(text):
    """An engine's RFC 3339 time (nanoseconds, `Z`) as seconds since the epoch."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    if not m:
        raise BenchError(f"not a time: {text!r}")
    whole = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return whole.timestamp() + float(f"0.{m.group(2) or 0}")


def cached_steps(output):
    """Steps the classic builder took from its cache, by its output."""
    return output.count("---> Using cache")


def run_phase(i, runs):
    """The phase (fraction of a wall-clock second) run i of `runs` starts its builds at: the
    runs' phases spread evenly over the second."""
    return ((i - 0.5) / runs) % 1.0


def at_phase(phase):
    """Waits until the wall clock's fraction of a second is `phase`. On engines whose storage
    driver diffs naively (fuse-overlayfs here, vfs) every committed build step ends on a whole
    second (moby's NaiveDiffDriver.Diff sleeps until the next one), so a build's time depends on
    the phase it starts at, by up to a second: previewd and the floor start a run's builds at
    the same phase (see run_phase), not at whatever phase the other's last step left."""
    time.sleep((phase - time.time() % 1.0) % 1.0)


def builds_run(b, i, r):
    """One run of the upload figures: a cold build and launch by previewd and by the floor
    (alternating which goes first), then a one-file change of site/ rebuilt and redeployed by
    each, in the same order. Both are removed again."""
    name = f"build-{i}"
    tokens = {who: f"{b.instance}-{who}-{i}-{secrets.token_hex(4)}" for who in ("previewd", "floor")}
    order = ("previewd", "floor") if i % 2 else ("floor", "previewd")
    floor_dir = b.work / "builds" / f"floor-{i}"
    tags = [f"bench-{b.instance}/app:{i}-cold", f"bench-{b.instance}/app:{i}-warm"]
    cid = None
    phase = run_phase(i, b.s.runs)
    for who in order:
        files = app_files(tokens[who], f"{who} {i} cold")
        if who == "previewd":
            body = tar_of(files)
            at_phase(phase)
            t = time.monotonic()
            upload_build(b, name, body)
            b.wait_preview(name)
            r["p_cold"].append(time.monotonic() - t)
            r["p_cold_build"].append(build_seconds(build_log(b, name)))
        else:
            write_tree(floor_dir, files)
            at_phase(phase)
            t = time.monotonic()
            b.floor_build(floor_dir, tags[0])
            r["f_cold_build"].append(time.monotonic() - t)
            cid = b.floor_launch(name, tags[0], ())
            r["f_cold"].append(time.monotonic() - t)
    for who in order:
        page = f"{who} {i} warm"
        if who == "previewd":
            body = tar_of(app_files(tokens[who], page))
            host = f"{name}.{BASE_DOMAIN}:{b.nginx_port}"
            at_phase(phase)
            t = time.monotonic()
            # previewd answers once it has retired the replaced container, after the new page is
            # served: the time is until the page is (the floor's `docker rm -f` of its old
            # container is not counted either).
            answered = in_background(lambda: upload_build(b, name, body))
            wait_until(lambda: page_is(page)(b.nginx_port, host), b.s.timeout, f"{name}'s new page")
            r["p_warm"].append(time.monotonic() - t)
            answered()
            text = build_log(b, name)
            r["p_warm_build"].append(build_seconds(text))
            r["p_cached"].append(cached_steps(text))
        else:
            write_tree(floor_dir, {"site/index.html": f"{page}\n"})
            at_phase(phase)
            t = time.monotonic()
            r["f_cached"].append(cached_steps(b.floor_build(floor_dir, tags[1])))
            r["f_warm_build"].append(time.monotonic() - t)
            cid = b.floor_replace(name, tags[1], cid, page_is(page))
            r["f_warm"].append(time.monotonic() - t)
    b.kill_preview(name)
    docker("rm", "-f", cid)
    b.floor.unroute(name)
    b.floor.reload()
    b.remove_floor_images(tags)
    log(f"builds run {i}: cold: previewd {r['p_cold'][-1]:.2f} s, floor {r['f_cold'][-1]:.2f} s; warm: previewd "
        f"{r['p_warm'][-1]:.2f} s, floor {r['f_warm'][-1]:.2f} s")


def download_tarball(b, repo, sha, dest):
    """A commit's source as previewd gets it from GitHub: the API's tarball answers a redirect to
    codeload (followed without the token), whose gzip'd tarball is extracted into `dest`, its top
    directory stripped."""
    conn = http.client.HTTPConnection("127.0.0.1", b.github.port, timeout=b.s.timeout)
    try:
        conn.request("GET", f"/repos/{repo}/tarball/{sha}", headers={
            "Authorization": f"Bearer {GITHUB_TOKEN}", "Accept": "application/vnd.github+json", "User-Agent": "bench"})
        response = conn.getresponse()
        response.read()
        location = response.getheader("Location")
    finally:
        conn.close()
    if response.status != 302 or not location:
        raise BenchError(f"the tarball of {repo}@{sha} answered {response.status}, Location {location!r}")
    url = urllib.parse.urlsplit(location)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=b.s.timeout)
    try:
        conn.request("GET", url.path + (f"?{url.query}" if url.query else ""), headers={"User-Agent": "bench"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise BenchError(f"codeload answered {response.status} for {location}: {data[:200]!r}")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            parts = [part for part in member.name.split("/")[1:] if part]
            if ".." in parts:
                raise BenchError(f"the tarball of {repo}@{sha} holds {member.name!r}")
            if not parts:
                continue
            target = dest.joinpath(*parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                target.chmod(member.mode & 0o777)
    return dest


def bench_push(b, r):
    """A pull request of a repository with `build:`, opened, then pushed to RUNS times: each push a
    commit changing site/index.html, GitHub's new state held by the fake and its synchronize
    delivery sent, timed until the commit's page is served; the floor downloads its own commit of
    the same change (its own first step: no layers of previewd's) from the fake, builds and
    replaces its container."""
    repo, slug = f"{REPO_OWNER}/{BUILD_REPO_NAME}", f"{BUILD_REPO_NAME}-pr-{BUILD_PR}"
    fixture = json.loads(b.s.fixture.read_text())
    pushes = b.work / "pushes"
    tokens = {who: f"{b.instance}-{who}-push-{secrets.token_hex(4)}" for who in ("previewd", "floor")}
    clock = [datetime.datetime.now(datetime.timezone.utc)]

    def commit(who, n):
        """Commit n of `who`'s app, its tree given to the fake GitHub: (sha, its page)."""
        sha = hashlib.sha1(f"{tokens[who]}-{n}".encode()).hexdigest()
        page = f"{who} commit {n}"
        b.github.set_commit(repo, sha, write_tree(pushes / f"tree-{who}-{n}", app_files(tokens[who], page)))
        return sha, page

    def hold(sha, action):
        """The pull request's head moves to `sha` on GitHub (a later updated_at each time): the
        body of the delivery that says so."""
        clock[0] = max(clock[0] + datetime.timedelta(seconds=1), datetime.datetime.now(datetime.timezone.utc))
        at = clock[0].strftime("%Y-%m-%dT%H:%M:%SZ")
        body = delivery_body(fixture, BUILD_PR, sha, at, BUILD_REPO_NAME, action)
        path = pushes / f"{sha}.json"
        path.write_bytes(body)
        b.github.set_pull(path)
        return body

    def send(body):
        status, _ = deliver_body(b, body)
        if status != 202:
            raise BenchError(f"the delivery for {slug} answered {status}")

    def served_previewd(page):
        host = f"{slug}.{BASE_DOMAIN}:{b.nginx_port}"
        wait_until(lambda: page_is(page)(b.nginx_port, host), b.s.timeout, f"{slug} serving {page!r}")

    pushes.mkdir()
    sha, page = commit("previewd", 0)
    send(hold(sha, "opened"))
    served_previewd(page)
    log(f"{slug} serves its first commit")
    sha, page = commit("floor", 0)
    tags = [f"bench-{b.instance}/push:0"]
    b.floor_build(download_tarball(b, repo, sha, pushes / "floor-0"), tags[0])
    cid = b.floor_launch(slug, tags[0], ())
    for i in range(1, b.s.runs + 1):
        p_sha, p_page = commit("previewd", i)
        body = hold(p_sha, "synchronize")
        f_sha, f_page = commit("floor", i)
        for who in (("previewd", "floor") if i % 2 else ("floor", "previewd")):
            at_phase(run_phase(i, b.s.runs))
            t = time.monotonic()
            if who == "previewd":
                send(body)
                served_previewd(p_page)
                r["p_push"].append(time.monotonic() - t)
                r["p_push_build"].append(build_seconds(build_log(b, slug)))
            else:
                source = download_tarball(b, repo, f_sha, pushes / f"floor-{i}")
                r["f_push_download"].append(time.monotonic() - t)
                t2 = time.monotonic()
                tags.append(f"bench-{b.instance}/push:{i}")
                b.floor_build(source, tags[-1])
                r["f_push_build"].append(time.monotonic() - t2)
                cid = b.floor_replace(slug, tags[-1], cid, page_is(f_page))
                r["f_push"].append(time.monotonic() - t)
        log(f"push {i}: previewd {r['p_push'][-1]:.2f} s, floor {r['f_push'][-1]:.2f} s")
    # codeload's downloads less the floor's own (its first commit and one a run): previewd's
    r["push_tarballs"] = b.github.summary().get("tarballs", 0) - (b.s.runs + 1)
    b.kill_preview(slug)
    docker("rm", "-f", cid)
    b.floor.unroute(slug)
    b.floor.reload()
    b.remove_floor_images(tags)


class RandomBytes:
    """A file-like of `size` random bytes (what a context's binary data looks like to gzip)."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def big_context(path, mib):
    """A tar of a Dockerfile (the demo app, FROM previewd-demo:latest, no step) and `mib` MiB of
    random bytes in one file: its size in bytes."""
    dockerfile = f"FROM {IMAGE}\nCMD {json.dumps(DEMO_COMMAND)}\n".encode()
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, size, data in (("Dockerfile", len(dockerfile), io.BytesIO(dockerfile)),
                                 ("blob.bin", mib << 20, RandomBytes(mib << 20))):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = size, 0o644, int(time.time())
            tar.addfile(info, data)
    return path.stat().st_size


def bench_upload_memory(b, r):
    """previewd's RSS, sampled every 10 ms, while a big context is uploaded (sent as fast as the
    connection takes it, with its Content-Length), then while previewd builds and launches it."""
    name = "big-context"
    path = b.work / "big-context.tar"
    size = big_context(path, b.s.upload_mib)
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic(), b.rss_kb()))
            time.sleep(0.01)

    time.sleep(1)
    before, hwm_before = b.rss_kb(), b.hwm_kb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", b.api_port, timeout=max(b.s.timeout, 600))
    try:
        conn.putrequest("POST", f"/api/builds?image=web&name={name}")
        for key, value in (("Authorization", b.auth), ("Content-Type", "application/x-tar"),
                           ("Accept", "application/json"), ("Content-Length", str(size))):
            conn.putheader(key, value)
        conn.endheaders()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 16):
                    conn.send(chunk)
        except OSError as err:
            log(f"the upload stopped: {err}")  # previewd answered early: its answer says why
        sent = time.monotonic()
        response = conn.getresponse()
        answer = response.read()
    finally:
        conn.close()
        stop.set()
        sampler.join()
    answered = time.monotonic()
    path.unlink()
    if response.status != 200:
        raise BenchError(f"the upload of {size} bytes answered {response.status}: {answer[:300]!r}")
    b.wait_preview(name)
    time.sleep(1)
    during = [kb for at, kb in samples if at <= sent]
    after_upload = [kb for at, kb in samples if at > sent]
    r["mem"] = dict(size=size, before=before, peak_upload=max(during, default=0),
                    peak_build=max(after_upload, default=0), after=b.rss_kb(), hwm_before=hwm_before,
                    hwm_after=b.hwm_kb(), upload_s=sent - t, build_s=answered - sent, samples=len(samples))
    b.kill_preview(name)


def bench_builds(b):
    log(f"7. builds from source: {b.s.runs} runs of a cold build and a rebuild, {b.s.runs} pushes, "
        f"and a {b.s.upload_mib} MiB upload")
    docker("image", "inspect", IMAGE)
    b.clear()
    r = {key: [] for key in ("p_cold", "f_cold", "p_cold_build", "f_cold_build", "p_warm", "f_warm",
                             "p_warm_build", "f_warm_build", "p_cached", "f_cached", "p_push",
                             "f_push", "p_push_build", "f_push_download", "f_push_build")}
    for i in range(1, b.s.runs + 1):
        builds_run(b, i, r)
    bench_push(b, r)
    bench_upload_memory(b, r)
    r["images_left"] = len(docker("images", "-q", "--filter", f"label=previewd.instance={b.instance}").split())
    b.r["builds"] = r


# --------------------------------------------------------------------------------------------
# Section: sleep and wake

SLEEP_CROWD = 50  # concurrent first requests to one sleeping preview
SLEEP_FLEET = 20  # previews whose memory is read awake and asleep


def bench_sleep(b):
    """Wake latency of a held request vs `docker start` + health by hand, one wake for a crowd of
    first requests, and the host's memory with a fleet of previews awake and asleep."""
    log(f"8. sleep and wake: {b.s.runs} wakes each, {SLEEP_CROWD} concurrent first requests, "
        f"{SLEEP_FLEET} previews awake and asleep")
    r = {"p_wake": [], "f_wake": []}
    host = f"nap.{BASE_DOMAIN}:{b.nginx_port}"
    b.launch("nap")
    b.wait_preview("nap")
    port = free_port()
    cid = docker("run", "-d", "--label", f"bench.floor={b.instance}", "-p", f"127.0.0.1:{port}:3000", IMAGE,
                 *DEMO_COMMAND).strip()
    wait_until(lambda: status_of(port, "/", f"127.0.0.1:{port}") == 200, b.s.timeout, "the floor's container")
    try:
        for i in range(1, b.s.runs + 1):
            put_to_sleep(b, "nap")
            t = time.monotonic()
            # One request, held by previewd until the app answers it.
            status = status_of(b.nginx_port, "/", host, timeout=b.s.timeout)
            r["p_wake"].append(time.monotonic() - t)
            if status != 200:
                raise BenchError(f"the held request to the sleeping preview answered {status}")
            docker("stop", "-t", "1", cid)
            t = time.monotonic()
            docker("start", cid)
            wait_until(lambda: status_of(port, "/", f"127.0.0.1:{port}") == 200, b.s.timeout, "the floor's start",
                       pause=0.005)
            r["f_wake"].append(time.monotonic() - t)
            log(f"wake {i}: previewd {r['p_wake'][-1]:.3f} s, docker start + health {r['f_wake'][-1]:.3f} s")
    finally:
        docker("rm", "-f", cid, check=False)
    put_to_sleep(b, "nap")
    wakes_before = b.metric('previewd_wakes_total{result="success"}')
    t = time.monotonic()
    statuses = parallel(lambda _: status_of(b.nginx_port, "/", host, timeout=b.s.timeout), range(SLEEP_CROWD),
                        SLEEP_CROWD)
    r["crowd_s"] = time.monotonic() - t
    r["crowd_ok"] = sum(status == 200 for status in statuses)
    r["crowd_wakes"] = b.metric('previewd_wakes_total{result="success"}') - wakes_before
    b.kill_preview("nap")
    fleet = [f"fleet-{i}" for i in range(1, SLEEP_FLEET + 1)]
    parallel(b.launch, fleet, 4)
    time.sleep(5)
    r["mem_awake"] = mem_available_mb()
    for name in fleet:
        put_to_sleep(b, name)
    time.sleep(5)
    r["mem_asleep"] = mem_available_mb()
    for name in fleet:
        b.kill_preview(name)
    b.r["sleep"] = r


def put_to_sleep(b, name):
    status, body = b.api("POST", f"/api/previews/{name}/sleep")
    if status != 200:
        raise BenchError(f"the sleep of {name} answered {status}: {body[:300]!r}")


# --------------------------------------------------------------------------------------------
# Section 8: scale


def scale_fill(b):
    """Launches scale-1.. (SCALE_PARALLEL at a time) until SCALE run, the host's available memory
    falls below the reserve, the time budget runs out or a launch fails: (seconds, why it stopped)."""
    stop, lock = [], threading.Lock()
    deadline = time.monotonic() + b.s.scale_budget

    def halt(reason):
        with lock:
            stop.append(reason)

    def one(i):
        if stop:
            return
        avail = mem_available_mb()
        if avail < b.s.mem_reserve_mb:
            return halt(f"the host's available memory fell to {avail} MiB (reserve: {b.s.mem_reserve_mb} MiB)")
        if time.monotonic() >= deadline:
            return halt(f"the time budget of {b.s.scale_budget}s ran out")
        try:
            status, body = b.api("POST", "/launch", {"image_name": "demo", "container_name": f"scale-{i}"},
                                 timeout=300)
        except (OSError, http.client.HTTPException) as err:
            status, body = 0, str(err).encode()
        if status != 200:
            halt(f"the launch of scale-{i} failed: {status} {body[:200]!r}")
        if i % 50 == 0:
            log(f"launched up to scale-{i}")

    t = time.monotonic()
    parallel(one, range(1, b.s.scale + 1), b.s.scale_parallel)
    return time.monotonic() - t, (stop[0] if stop else "")


def docker_list(b):
    """What previewd asks Docker for a list, straight from the Engine API (the docker CLI's
    --format json would ask for sizes, slow on fuse-overlayfs)."""
    filters = json.dumps({"label": ["previewd.managed=true", f"previewd.instance={b.instance}"]})
    status, _ = docker_api("GET", "/containers/json", {"all": "true", "filters": filters})
    if status != 200:
        raise BenchError(f"Docker's container list answered {status}")


def docker_start_ms(b, *args):
    """Creates a demo container, times Docker's start API call alone (ms), removes it."""
    cid = docker("create", "--label", f"bench.floor={b.instance}", *args, IMAGE,
                 "/bin/busybox", "httpd", "-f", "-p", "3000", "-h", "/www").strip()
    t = time.monotonic()
    status, body = docker_api("POST", f"/containers/{cid}/start")
    ms = (time.monotonic() - t) * 1000
    docker("rm", "-f", cid)
    if status not in (204, 304):
        raise BenchError(f"Docker's start answered {status}: {body[:200]!r}")
    return ms


def managed_nginx_test(b):
    d = b.work / "state/nginx"
    run(["nginx", "-t", "-q", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")])


def floor_mirror_vhosts(b):
    """The floor's nginx gets previewd's vhosts (moved to the floor's port) and no others."""
    b.floor.clear()
    for path in (b.work / "state/nginx/sites").glob("*.conf"):
        text = path.read_text().replace(f"127.0.0.1:{b.nginx_port}", f"127.0.0.1:{b.floor_port}")
        (b.floor.dir / "sites" / path.name).write_text(text)


def floor_restart(b, probe):
    """previewd's restart by hand: stop an nginx that has previewd's vhosts (moved to the floor's
    port) gracefully, list the containers, start nginx again, until the probe is served: seconds."""
    floor_mirror_vhosts(b)
    b.floor.reload()
    time.sleep(1)
    pid = b.floor.pid()
    t = time.monotonic()
    b.floor.nginx("-s", "quit")
    # Until it is gone or a zombie: its parent here is init, which may reap it only later.
    wait_until(lambda: process_gone(pid), b.s.timeout, "the floor's nginx stopped")
    docker_list(b)
    b.floor.start()
    b.wait_200(f"{probe}.{BASE_DOMAIN}", b.floor_port)
    return time.monotonic() - t


def process_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def scale_point(b, tag):
    """At the current number of previews: launch latency (median of RUNS launches, each killed
    again), the route step of a redeploy of each (mean, from /metrics: a new preview's route may
    overlap its start, a redeploy's cannot), nginx -t (median of 3), Docker's container start in
    previewd (mean, from /metrics), the floor's launch latency (median of RUNS, its nginx holding
    the same vhosts as previewd's) and Docker's start by hand with and without a published port."""
    start = 'previewd_launch_step_seconds_{}{{step="start"}}'
    route = 'previewd_launch_step_seconds_{}{{step="route"}}'
    start0 = (b.metric(start.format("sum")), b.metric(start.format("count")))
    lat, routes = [], []
    for i in range(1, b.s.runs + 1):
        name = f"probe-{tag}-{i}"
        t = time.monotonic()
        b.launch(name)
        b.wait_preview(name)
        lat.append(time.monotonic() - t)
        sum0, count0 = b.metric(route.format("sum")), b.metric(route.format("count"))
        b.launch(name)
        sum1, count1 = b.metric(route.format("sum")), b.metric(route.format("count"))
        if count1 > count0:
            routes.append((sum1 - sum0) / (count1 - count0))
        b.kill_preview(name)
    count = b.metric(start.format("count")) - start0[1]
    point = {"lat": median(lat), "route": statistics.mean(routes) if routes else 0.0,
             "start": (b.metric(start.format("sum")) - start0[0]) / count if count > 0 else 0.0}
    floor_mirror_vhosts(b)
    floor = []
    for i in range(1, b.s.runs + 1):
        t = time.monotonic()
        b.floor_launch(f"scale-floor-{tag}-{i}")
        floor.append(time.monotonic() - t)
        docker("rm", "-f", docker("ps", "-q", "--filter", f"label=bench.floor={b.instance}").split()[0])
    b.floor.clear()
    b.floor.reload()
    point["floor"] = median(floor)
    # Docker's start alone, with the port published as previewd and the floor do and without.
    point["start_p"] = median([docker_start_ms(b, "-p", "127.0.0.1::3000") for _ in range(b.s.runs)])
    point["start_nop"] = median([docker_start_ms(b) for _ in range(b.s.runs)])
    tests = []
    for _ in range(3):
        t = time.monotonic()
        managed_nginx_test(b)
        tests.append(time.monotonic() - t)
    point["nginx_t"] = median(tests)
    return point


def bench_scale(b):
    log(f"7. scale: {b.s.scale} running previews ({b.s.scale_parallel} launches at a time)")
    b.clear()
    b.r["point0"] = scale_point(b, "0")
    mem0 = mem_available_mb()
    fill, why = scale_fill(b)
    reached = len(docker("ps", "-q", "--filter", f"label=previewd.instance={b.instance}",
                         "--filter", "status=running").split())
    if why:
        log(f"stopped at {reached} previews: {why}")
    limits = f"ulimit -n {open_files_limit()}, previewd's {previewd_open_files(b)}, {threads_max()} threads-max"
    b.r.update(scale_fill=fill, scale_why=why, reached=reached, scale_limits=limits, rss_scale=b.rss_kb(),
               scale_mem=(mem0 - mem_available_mb()) // max(reached, 1))
    b.r["pointN"] = scale_point(b, "n")
    bench_list(b)
    bench_restart(b)


def open_files_limit():
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def previewd_open_files(b):
    with open(f"/proc/{b.daemon.pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


def threads_max():
    return Path("/proc/sys/kernel/threads-max").read_text().strip()


def bench_list(b):
    """GET /api/previews vs Docker's own list, median of 5."""
    b.api("GET", "/api/previews", timeout=60)  # authenticates once (argon2)
    listed, docker_times = [], []
    body = b"[]"
    for _ in range(5):
        t = time.monotonic()
        _, body = b.api("GET", "/api/previews", timeout=60)
        listed.append(time.monotonic() - t)
        t = time.monotonic()
        docker_list(b)
        docker_times.append(time.monotonic() - t)
    previews = json.loads(body)
    b.r.update(list_n=len(previews), list_p=median(listed), list_f=median(docker_times),
               probe=next((p["name"] for p in previews if p.get("status") == "running"), None))


def bench_restart(b):
    log(f"restart with {b.r['reached']} previews")
    b.r["rss_scale_peak"] = b.hwm_kb()
    t = time.monotonic()
    b.stop_daemon()
    b.r["restart_stop"] = time.monotonic() - t
    t2 = time.monotonic()
    b.start_daemon(900)
    b.r["restart_start"] = time.monotonic() - t2
    b.r["restart_total"] = time.monotonic() - t
    probe = b.r["probe"]
    if probe:
        b.wait_preview(probe)
        b.r["restart_dark"] = f"{time.monotonic() - t:.2f} s"
        b.r["restart_floor"] = floor_restart(b, probe)
    else:
        b.r.update(restart_dark="not measured (no preview to probe)", restart_floor=0.0)
    reports = [e["fields"] for e in b.previewd_log_events() if e.get("fields", {}).get("message") == "reconciled"]
    last = reports[-1] if reports else {}
    b.r["restart_report"] = (f"routed {last.get('routed')}, removed {last.get('removed_containers')} containers and "
                             f"{last.get('removed_vhosts')} vhosts, {last.get('failed')} failed")
    time.sleep(1)
    b.r["rss_restart"] = b.rss_kb()


# --------------------------------------------------------------------------------------------
# BENCHMARKS.md


def machine_line(b):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_gib = next(int(line.split()[1]) // 2**20 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    docker_version = docker("version", "--format", "{{.Server.Version}}").strip()
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().split(": ")[-1]
    rev = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).strip()
    dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]).strip()
    return (f"{os.cpu_count()} cores ({cpu}), {mem_gib} GiB, Docker {docker_version}, {nginx_version}, "
            f"previewd {rev}{' with uncommitted changes' if dirty else ''} (release build)")


def measured_by(b):
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"Measured by `{b.s.command}` on {today}: {machine_line(b)}."


def load_row(fields):
    return (f"{fields.get('requests')} requests ({fields.get('rate')}/s): {fields.get('failed')} failed "
            f"({fields.get('statuses')}), {fields.get('resent')} resent")


def main_rows(b):
    """The rows of the main table, of the sections that ran."""
    r, s, rows = b.r, b.s, []
    ran = set(s.only)
    if "launch" in ran:
        rows.append(f"| launch latency, median of {s.runs} (request to first 200 through nginx) | {r['p_lat']:.3f} s "
                    f"| {r['f_lat']:.3f} s | {ratio(r['p_lat'], r['f_lat'])}× | ≤ 1.10× |")
    if "burst" in ran:
        rows.append(f"| burst: {s.burst} launches at once, wall time until all served | {r['p_burst']:.2f} s "
                    f"| {r['f_burst']:.2f} s | {ratio(r['p_burst'], r['f_burst'])}× | |")
        rows.append(f"| burst: nginx reloads | {r['burst_reloads']} | {s.burst} | | ≤ 5 |")
    if "redeploy" in ran:
        rows.append(
            f"| {s.redeploys} redeploys of one preview while GETs go through nginx at {s.load_rate}/s on kept-alive "
            "connections (as a browser: a request on a connection nginx closed as the reload retired its worker is "
            f"sent again once, counted as resent) and at {s.load_rate}/s on fresh connections "
            f"| kept-alive: {load_row(r['load_keepalive'])}; fresh: {load_row(r['load_fresh'])} "
            f"| same load, no redeploy: kept-alive: {load_row(r['base_keepalive'])}; fresh: {load_row(r['base_fresh'])} "
            "| | 0 failed |")
    if "webhooks" in ran:
        rows.append(
            f"| webhooks: {s.burst} signed `pull_request` `opened` deliveries at once, wall time until all {s.burst} "
            f"previews served ({r['hook_202']} answered 202, the slowest in {r['hook_slowest']:.3f} s; feedback: "
            f"{r['hook_success']} `success` statuses, {r['hook_comments']} comments, {r['hook_api_errors']} failed "
            f"API calls) | {r['p_hooks']:.2f} s | {r['f_hooks']:.2f} s | {ratio(r['p_hooks'], r['f_hooks'])}× | |")
        rows.append(f"| webhooks: nginx reloads | {r['hook_reloads']} | {s.burst} | | ≤ 5 |")
    if "intake" in ran:
        i, fl = r["intake"], r["flood"]
        others = {}
        for status in i["others"]:
            others[status] = others.get(status, 0) + 1
        other_text = f" (others:{''.join(f' {n}× {st}' for st, n in others.items())})" if others else ""
        rows.append(
            f"| webhook intake: signed deliveries for the {s.burst} running PR previews, paced at {s.intake_rate}/s "
            f"for {s.intake_seconds}s (wrk + Lua, 50 connections); each answered 202 queues a check of the running "
            "commit (at most one waiting per pull request), which launches nothing "
            f"| {i['rate']:.0f} req/s, p50 {i['p50']:.2f} ms, p99 {i['p99']:.2f} ms; {i['good']} of {i['requests']} "
            f"answered 202{other_text}, {i['socket']} socket errors; queued work done {r['intake_drain']}; "
            f"{r['intake_launches']} launches | | | {s.intake_rate} req/s, all 202 |")
        rows.append(
            f"| bad signatures, wrk at full speed for {s.flood_seconds}s (50 connections) | {fl['rate']:.0f} req/s, "
            f"p50 {fl['p50']:.2f} ms, p99 {fl['p99']:.2f} ms; {fl['good']} of {fl['requests']} answered 401 (counted "
            f"rejected: {r['flood_rejected']}), {fl['socket']} socket errors | | | |")
    if "scale" in ran:
        rows.extend(scale_rows(b))
    rows.append(rss_row(b))
    return rows


def scale_rows(b):
    r, s = b.r, b.s
    p0, pn, n = r["point0"], r["pointN"], r["reached"]
    scale_n = f"{n} previews" if n >= s.scale else f"{n} previews (of {s.scale}: {r['scale_why'] or 'see the log'})"
    ms = "{:.1f}".format
    return [
        f"| scale: launch latency with {scale_n} running, median of {s.runs} ({r['scale_fill']:.2f} s to launch them "
        f"{s.scale_parallel} at a time; ≈ {r['scale_mem']} MiB of host memory each; {r['scale_limits']}) "
        f"| {pn['lat']:.3f} s | 0 previews: {p0['lat']:.3f} s. The floor, its nginx holding the same vhosts: "
        f"{p0['floor']:.3f} s at 0, {pn['floor']:.3f} s at {n} ({ratio(pn['floor'], p0['floor'])}×); Docker's "
        f"container start alone, mean in previewd: {p0['start']:.3f} s at 0, {pn['start']:.3f} s at {n}; by hand, "
        f"median of {s.runs}: with a port published on 127.0.0.1 {p0['start_p']:.0f} ms at 0, {pn['start_p']:.0f} ms "
        f"at {n}, without {p0['start_nop']:.0f} ms at 0, {pn['start_nop']:.0f} ms at {n} "
        f"| {ratio(pn['lat'], p0['lat'])}× (floor: {ratio(pn['floor'], p0['floor'])}×) | ≤ 1.20× |",
        f"| scale: GET /api/previews with {r['list_n']} previews, median of 5 | {r['list_p']:.3f} s | the same list "
        f"from Docker's API: {r['list_f']:.3f} s | {ratio(r['list_p'], r['list_f'])}× | |",
        f"| scale: restart with {n} previews, SIGTERM until /healthz says ok (stop {r['restart_stop']:.2f} s, start "
        f"and reconcile {r['restart_start']:.2f} s: {r['restart_report']}); previews unreachable meanwhile: "
        f"{r['restart_dark']} | {r['restart_total']:.2f} s | by hand: stop an nginx with the same vhosts, Docker's "
        f"list, start it until a preview is served: {r['restart_floor']:.2f} s "
        f"| {ratio(r['restart_total'], r['restart_floor'])}× | |",
        f"| scale: route step of a redeploy (vhost, `nginx -t`, reload, until only new workers accept), mean of "
        f"{s.runs}, with {n} vhosts | {ms(pn['route'] * 1000)} ms | 0 previews: {ms(p0['route'] * 1000)} ms "
        f"| {ratio(pn['route'], p0['route'])}× | |",
        f"| scale: `nginx -t` of previewd's nginx config, median of 3, with {n} vhosts | {ms(pn['nginx_t'] * 1000)} ms "
        f"| 0 previews: {ms(p0['nginx_t'] * 1000)} ms | {ratio(pn['nginx_t'], p0['nginx_t'])}× | |",
    ]


def rss_row(b):
    """previewd's RSS at the points the sections that ran passed."""
    r = b.r
    n = r.get("reached")
    points = [("idle", r.get("rss_idle"))]
    if "rss_burst" in r:
        points += [("after the burst", r["rss_burst"]), ("peak during the burst", r["rss_peak"])]
    if "rss_scale" in r:
        points += [(f"with {n} previews (peak until then)", None), ("after restarting with them", r["rss_restart"])]
    names = " / ".join(name for name, _ in points)
    values = []
    for name, value in points:
        if value is None:
            values.append(f"{r['rss_scale'] // 1024} ({r['rss_scale_peak'] // 1024})")
        else:
            values.append(str(value // 1024))
    return f"| previewd RSS {names} | {' / '.join(values)} MiB | | | |"


def render_main(b):
    return f"""# Benchmarks

{measured_by(b)}
The floor is the same work done by hand in the same run: `docker run -d -p 127.0.0.1::3000`, one vhost,
`nginx -s reload`, poll until the URL answers 200. Where there is no floor, the scale rows compare
with the same figure at 0 previews. Webhooks are GitHub's example `pull_request` `opened` payload
with other PR numbers, signed like GitHub signs them; previewd's feedback goes to the tests' fake
GitHub API (`tests/common/github.rs`, run by `examples/fake_github.rs`) on loopback. This machine is
shared and noisy: compare the ratios, not the absolute times.

| figure | previewd | floor | ratio | target |
| --- | --- | --- | --- | --- |
{chr(10).join(main_rows(b))}

A Docker engine restart is not benchmarked (it would disturb everything else on the machine):
`scripts/drills.sh` drills it against a second engine of its own, as part of `scripts/test.sh`.
"""


def steps_text(step_dicts):
    """Median seconds of each step over the runs, in the order they came."""
    names = []
    for steps in step_dicts:
        names += [name for name in steps if name not in names]
    return ", ".join(f"{name} {median([s.get(name, 0.0) for s in step_dicts]):.2f} s" for name in names)


def memory_text(memories):
    total = median([m["total"] for m in memories])
    parts = ", ".join(f"{part} {median([m.get(part, 0.0) for m in memories]):.1f}" for part in ("app", "db", "cache"))
    return f"{total:.1f} MiB ({parts})"


def paired(previewd, by_hand):
    """The median of the runs' own ratios, and in how many runs previewd was faster."""
    ratios = [p / h for p, h in zip(previewd, by_hand) if h > 0]
    faster = sum(p < h for p, h in zip(previewd, by_hand))
    return f"{median(ratios):.2f}× the median of each run's own ratio; previewd faster in {faster} of {len(ratios)}"


def render_sleep(b):
    r, runs = b.r["sleep"], b.s.runs
    p, f = median(r["p_wake"]), median(r["f_wake"])
    freed = r["mem_asleep"] - r["mem_awake"]
    return f"""{SLEEP_HEADING}

{measured_by(b)}
The demo app (busybox httpd) as one preview. Each of the {runs} runs puts it to sleep (`POST
/api/previews/nap/sleep`: routed to previewd's wake listener, its container stopped), then times one
`GET /` through nginx (no `Accept: text/html`, so previewd holds it) until it is answered 200 by the
app: previewd starts the app container again, waits until it answers, passes the held request on
to it, and routes it again. By hand is a container of the same image published on a fixed
127.0.0.1 port: `docker stop`, then `docker start` timed until its port answers 200 (polled every
5 ms, directly, without nginx).

| figure | previewd | by hand | ratio | target |
| --- | --- | --- | --- | --- |
| wake: the first (held) request to a sleeping preview until answered, median of {runs} (min–max) | {spread(r['p_wake'], '{:.3f}')} | `docker start` + health: {spread(r['f_wake'], '{:.3f}')} | {ratio(p, f)}× ({paired(r['p_wake'], r['f_wake'])}) | ≤ 1.5× |
| {SLEEP_CROWD} concurrent first requests to one sleeping preview | {r['crowd_ok']} of {SLEEP_CROWD} answered 200 in {r['crowd_s']:.2f} s; wakes: {r['crowd_wakes']:.0f} | | | one wake, {SLEEP_CROWD} answers |
| the host's available memory (`MemAvailable`) with {SLEEP_FLEET} demo previews awake, then asleep (5 s after each) | {r['mem_awake']} MiB → {r['mem_asleep']} MiB: {freed} MiB freed, {freed / SLEEP_FLEET:.1f} MiB a preview | | | |
"""


def render_environments(b):
    e, runs = b.r["env"], b.s.runs
    left = [x for x in e["left"] if x]
    left_text = "nothing, in every run" if not left else "; ".join(str(x) for x in left)
    p, h, rd = median(e["p_launch"]), median(e["h_launch"]), median(e["p_redeploy"])
    return f"""{ENV_HEADING}

{measured_by(b)}
The shop environment of `tests/environments.rs`: `previewd-shop:demo` (port 5000, `/healthz`,
read-only root) with the services `db` (`previewd-postgres:15`, its data volume seeded from
`shop-db-seed`, 10,000 products; ready when `pg_isready` passes; `cap_add: [SETUID, SETGID]`) and
`cache` (`previewd-redis:7`, ready when port 6379 accepts), and the job `migrate` (`python3
migrate.py`). A launch is timed from the request until `/api/state` through nginx answers 200 with
the 10,000 products and `migrated: true`. By hand is the same with the docker CLI, one step after
the other as a script would: `docker network create`; `docker volume create` and the seed copied
into it (`docker run --rm` of the PostgreSQL image, `cp -a`, caps CHOWN FOWNER DAC_OVERRIDE FSETID,
`--network none`); `docker run -d` of PostgreSQL and Redis on that network as `db` and `cache`,
hardened as previewd does it (`--cap-drop ALL` plus their `cap_add`, `no-new-privileges`, the same
memory, pids and log limits); `pg_isready` by `docker exec` and Redis's port by TCP, each polled
every 50 ms; the migration (`docker run --rm` of the shop image); the app (`docker run -d -p
127.0.0.1:PORT:5000`); one vhost and `nginx -s reload` on the floor's nginx; poll until served.
Each of the {runs} runs does both, alternating which goes first, then redeploys previewd's, lets
both sit idle {b.s.env_idle:g} s, reads their memory and removes both. previewd keeps preview
networks ready (`network.warm`), so its launch does not create one; by hand does.

| figure | previewd | by hand | ratio | target |
| --- | --- | --- | --- | --- |
| launch of the shop environment, median of {runs} (min–max), request to the first 200 of `/api/state` through nginx with the seed and the migration | {spread(e['p_launch'])} | {spread(e['h_launch'])} | {ratio(p, h)}× ({paired(e['p_launch'], e['h_launch'])}) | ≤ 1.00× |
| where a launch's time goes, medians | {steps_text(e['p_steps'])} (previewd's NDJSON progress, the last step until the answer; then until `/api/state` served) | {steps_text(e['h_steps'])} | | |
| redeploy of it (same name: services kept in {e['services_kept']} of {runs}, the migration run in {e['migrated_again']} of {runs}, the app replaced), request until the answer and `/api/state` served by the new app, median of {runs} (min–max); its steps: {steps_text(e['r_steps'])} | {spread(e['p_redeploy'])} | previewd's fresh launch: {p:.2f} s | {ratio(rd, p)}× | ≤ 0.50× |
| kill (previewd: `POST /kill` until answered; by hand: `docker rm -f` of the three, `docker network rm`, `docker volume rm`, vhost removed, `nginx -s reload`), median of {runs} (min–max) | {spread(e['p_kill'])} | {spread(e['h_kill'])} | {ratio(median(e['p_kill']), median(e['h_kill']))}× | |
| memory of an idle environment after {b.s.env_idle:g} s, `docker stats` (usage less page cache), app + db + cache, median of {runs} in MiB | {memory_text(e['p_memory'])} | {memory_text(e['h_memory'])} | | |
| left of a preview after its kill (containers and volumes with its labels, its network, its vhost) | {left_text} | | | nothing |
"""


def render_builds(b):
    r, runs = b.r["builds"], b.s.runs
    m = r["mem"]

    def cmp(p, f):
        return f"{ratio(median(r[p]), median(r[f]))}× ({paired(r[p], r[f])})"

    def kb(value):
        return f"{value / 1024:.1f}"

    def build_row(what, p, f):
        """The builds of a figure: previewd's and the floor's."""
        p_build, f_build = median(r[f"{p}_build"]), median(r[f"{f}_build"])
        return (f"| of which the build{what} | {spread(r[f'{p}_build'])} "
                f"| {spread(r[f'{f}_build'])} | {ratio(p_build, f_build)}× | |")

    cached = f"previewd {median(r['p_cached']):.0f}, by hand {median(r['f_cached']):.0f} (medians)"
    rate = m["size"] / 2**20 / m["upload_s"] if m["upload_s"] > 0 else 0.0
    return f"""{BUILDS_HEADING}

{measured_by(b)}
The app: a Dockerfile `FROM previewd-demo:latest` with `RUN echo <token> > /token` (a token of its
own in every run, for previewd and by hand apart, so no build finds its layers in the cache),
`RUN sleep 1 && echo x > /x`, `COPY site/ /www/` (two small files) and `CMD` busybox httpd on port
3000. previewd gets it as a tar on `POST /api/builds?image=web&name=...` (`Accept:
application/json`: answered once built and launched) and builds it as it builds every preview: the
engine's classic builder (`POST /build`) with no step of its own (its labels go on the result as
a new image config, `POST /images/load`, without a build step), `cpu_shares` 256 and the memory
limit of `builds`, `RUN` steps on a network of the preview pool.
By hand is `DOCKER_BUILDKIT=0 docker build -t T dir` of the same files (its own token), then the
floor's launch (`docker run -d -p 127.0.0.1::3000 T`, one vhost, `nginx -s reload`, until served)
or, for a rebuild, its replacement (`docker run -d` of the new image, the vhost to its port,
reload, until the new page is served, then `docker rm -f` of the old; previewd's rebuild is
timed until the new page is served too, though previewd answers the upload only once it has
retired the old container). Each of the {runs} runs does both,
alternating which goes first; the push figure's runs alternate too. This engine's storage driver
(fuse-overlayfs) diffs naively, so every committed build step ends on a whole second of the wall
clock (moby's `NaiveDiffDriver` sleeps until the next one): each run starts previewd's and the
floor's builds at the same fraction of a second, and the runs spread that phase evenly over the
second (run i of n at (i − ½)/n), so neither side gains from the phase the other left. The push figure's repository
has `build: {{context: .}}`; its commits are served by the tests' fake GitHub (its codeload on a
second port, reached through the API's redirect, as on github.com).

| figure | previewd | by hand | ratio | target |
| --- | --- | --- | --- | --- |
| cold build + launch, median of {runs} (min–max): from the upload (by hand: `docker build`) until the first 200 through nginx | {spread(r['p_cold'])} | {spread(r['f_cold'])} | {cmp('p_cold', 'f_cold')} | ≤ 1.05× |
{build_row(": previewd's build log (from the upload received until tagged) vs `docker build`", "p_cold", "f_cold")}
| rebuild + redeploy of the same preview after a one-file change of `site/` (steps from the cache: {cached}), from the upload until the new page is served | {spread(r['p_warm'])} | {spread(r['f_warm'])} | {cmp('p_warm', 'f_warm')} | |
{build_row("", "p_warm", "f_warm")}
| push: a signed `pull_request` `synchronize` delivery (GitHub holding the new head) until the commit's page is served through nginx; previewd reads the pull request, downloads the tarball (codeload served it {r['push_tarballs']} archives for its {runs + 1} commits), builds on its cache, replaces the preview. By hand: the tarball from the same fake (API redirect, codeload, extracted: {spread(r['f_push_download'], '{:.3f}')}), `docker build`, replace | {spread(r['p_push'])} | {spread(r['f_push'])} | {cmp('p_push', 'f_push')} | |
{build_row("", "p_push", "f_push")}
| previewd's RSS during the upload of a {m['size'] / 2**20:.1f} MiB context ({b.s.upload_mib} MiB of random bytes in one file and a Dockerfile, sent with its `Content-Length` in {m['upload_s']:.1f} s, {rate:.0f} MiB/s), sampled every 10 ms ({m['samples']} samples): before / peak during the upload / peak during its build and launch ({m['build_s']:.1f} s) / after; VmHWM (the peak since previewd started) before → after | {kb(m['before'])} / {kb(m['peak_upload'])} / {kb(m['peak_build'])} / {kb(m['after'])} MiB; VmHWM {kb(m['hwm_before'])} → {kb(m['hwm_after'])} MiB | | | flat: streamed to disk |
| previewd's images left after the previews' kills | {r['images_left']} | | | 0 |
"""


def report_parts(text):
    """BENCHMARKS.md as (its main part, {heading: part}) for the separate sections: each part runs
    from its heading to the next separate section's heading, or the end."""
    marks = sorted((m.start(), heading) for heading in SEPARATE.values()
                   for m in re.finditer(rf"^{re.escape(heading)}$", text, re.M))
    ends = [at for at, _ in marks[1:]] + [len(text)]
    return text[:marks[0][0]] if marks else text, {heading: text[at:end] for (at, heading), end in zip(marks, ends)}


def write_report(b):
    """Writes BENCHMARKS.md: the parts of the sections that ran; the others kept as they were."""
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else ""
    old_main, old_parts = report_parts(old)
    ran = set(b.s.only)
    kept_main = old_main.partition(PARTIAL_HEADING)[0].rstrip("\n") + "\n" if old_main else "# Benchmarks\n"
    if set(MAIN_SECTIONS) <= ran:
        main = render_main(b)
    elif ran & set(MAIN_SECTIONS):
        # A run of some sections: the last full run's table stays whole, this one goes below it.
        partial = render_main(b).removeprefix("# Benchmarks\n")
        main = f"{kept_main}\n{PARTIAL_HEADING}\n{partial}"
    else:
        main = old_main.rstrip("\n") + "\n" if old_main else "# Benchmarks\n"
    renderers = {"environments": render_environments, "builds": render_builds, "sleep": render_sleep}
    parts = [renderers[section](b) if section in ran else old_parts.get(heading, "")
             for section, heading in SEPARATE.items()]
    path.write_text(main + "".join("\n" + part.rstrip("\n") + "\n" for part in parts if part))
    log("wrote BENCHMARKS.md")
    print(path.read_text())


def warnings_of_previewd(b):
    """previewd's warnings and errors, the 5 most frequent."""
    counts = {}
    for event in b.previewd_log_events():
        if event.get("level") in ("WARN", "ERROR"):
            message = event.get("fields", {}).get("message", "?")
            counts[message] = counts.get(message, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return "; ".join(f"{n}× {message}" for message, n in top)


# --------------------------------------------------------------------------------------------


SECTION_FUNCTIONS = {
    "launch": bench_launch,
    "burst": bench_burst,
    "redeploy": bench_redeploy,
    "webhooks": bench_webhooks,
    "intake": bench_intake,
    "environments": bench_environments,
    "builds": bench_builds,
    "sleep": bench_sleep,
    "scale": bench_scale,
}


def raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def main():
    os.chdir(ROOT)
    try:
        settings = Settings.from_env(sys.argv[1:], os.environ)
    except BenchError as err:
        log(f"ERROR: {err}")
        return 2
    # SIGINT too: a shell starts background jobs with it ignored, and Python then leaves it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_exit)
    signal.signal(signal.SIGHUP, raise_exit)
    bench = Bench(settings)
    code = 0
    started = time.monotonic()
    try:
        bench.prepare()
        for section in settings.only:
            SECTION_FUNCTIONS[section](bench)
        warnings = warnings_of_previewd(bench)
        if warnings:
            log(f"previewd warnings and errors: {warnings}")
        write_report(bench)
    except BenchError as err:
        log(f"ERROR: {err}")
        code = 1
    except subprocess.CalledProcessError as err:
        log(f"ERROR: {err}")
        code = 1
    except KeyboardInterrupt:
        code = 130
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup runs to its end
        bench.cleanup()
    log(f"done in {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)  # without waiting for threads still blocked in a request
