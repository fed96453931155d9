#!/usr/bin/env bash
# Prepares a machine for building and testing previewd. Idempotent.
#   - installs nginx, busybox-static, curl, ca-certificates if missing
#   - makes sure a Docker engine answers (starts dockerd if needed)
#   - builds the demo image previewd-demo:latest from local files only
#   - builds previewd-postgres:15 and previewd-redis:7 from Debian packages (scripts/service-images.sh)
#   - cargo build --release (skip with PREVIEWD_SKIP_BUILD=1)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive
DEMO_IMAGE=previewd-demo:latest

log() { echo "setup: $*" >&2; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        apt-get update -qq >/dev/null
        apt_updated=1
    fi
    log "installing $*"
    # A policy-rc.d that exits 101 keeps package post-install scripts from
    # starting services (previewd runs its own nginx with -p/-c).
    local policy=/usr/sbin/policy-rc.d made_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local rc=0
    apt-get install -y -qq --no-install-recommends "$@" >/tmp/previewd-setup-apt.log 2>&1 || rc=$?
    [ -n "$made_policy" ] && rm -f "$policy"
    [ "$rc" = 0 ] || { cat /tmp/previewd-setup-apt.log >&2; die "apt-get install $* failed"; }
}

have_pkg() { dpkg -s "$1" >/dev/null 2>&1; }

# --- Debian packages -------------------------------------------------------
missing=()
command -v nginx >/dev/null || missing+=(nginx)
have_pkg busybox-static || missing+=(busybox-static)
command -v curl >/dev/null || missing+=(curl)
have_pkg ca-certificates || missing+=(ca-certificates)
command -v systemd-analyze >/dev/null || missing+=(systemd)  # tests/install.rs: verify the unit
command -v openssl >/dev/null || missing+=(openssl)          # tests/install.rs: a TLS certificate
command -v shellcheck >/dev/null || missing+=(shellcheck)    # tests/install.rs: lint install.sh
command -v chromium >/dev/null || missing+=(chromium)          # tests/dashboard.rs: headless browser
command -v chromedriver >/dev/null || missing+=(chromium-driver) # tests/dashboard.rs: WebDriver for it
have_pkg fonts-dejavu-core || missing+=(fonts-dejavu-core)     # tests/dashboard.rs: a font for screenshots
command -v jq >/dev/null || missing+=(jq)                      # scripts/drills.sh
command -v ip >/dev/null || missing+=(iproute2)                # scripts/drills.sh: its engine's bridge
command -v debootstrap >/dev/null || missing+=(debootstrap)  # scripts/service-images.sh
command -v fuse-overlayfs >/dev/null || missing+=(fuse-overlayfs) # scripts/swarm-drills.sh: its nodes' storage
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

# --- Docker engine ---------------------------------------------------------
start_dockerd() {
    log "starting dockerd${*:+ $*} (log: /var/log/dockerd.log)"
    nohup dockerd "$@" >>/var/log/dockerd.log 2>&1 </dev/null &
    local pid=$! _
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || return 1 # dockerd exited: bad options
        sleep 1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || apt_install docker.io
    if ! start_dockerd; then
        # A storage driver fixed in daemon.json can't also be given as a flag.
        grep -qs storage-driver /etc/docker/daemon.json &&
            die "dockerd did not come up; see /var/log/dockerd.log"
        command -v fuse-overlayfs >/dev/null || apt_install fuse-overlayfs
        start_dockerd --storage-driver=fuse-overlayfs ||
            start_dockerd --storage-driver=vfs ||
            die "dockerd did not come up; see /var/log/dockerd.log"
    fi
fi

# --- demo image ------------------------------------------------------------
busybox=$(dpkg -L busybox-static | grep '/bin/busybox$') || die "busybox-static has no busybox binary"
# The label holds a hash of every input; rebuild only when it differs.
hash=$( { sha256sum "$busybox"; find scripts/demo-image -type f -print0 | sort -z |
    xargs -0 sha256sum; find scripts/demo-image -type f -perm -u+x | sort; } |
    sha256sum | cut -c1-16)
current=$(docker image inspect -f '{{ index .Config.Labels "previewd.demo.hash" }}' "$DEMO_IMAGE" 2>/dev/null || true)
if [ "$current" != "$hash" ]; then
    log "building $DEMO_IMAGE"
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' EXIT
    cp -r scripts/demo-image/. "$ctx/"
    cp "$busybox" "$ctx/busybox"
    chmod 755 "$ctx/busybox" "$ctx"/www/cgi-bin/*
    DOCKER_BUILDKIT=0 docker build -q --label "previewd.demo.hash=$hash" -t "$DEMO_IMAGE" "$ctx" \
        >/tmp/previewd-setup-build.log 2>&1 ||
        { cat /tmp/previewd-setup-build.log >&2; die "docker build failed"; }
    # Drop the image this build replaced, if any.
    docker image prune -f --filter label=previewd.demo.hash >/dev/null
else
    log "$DEMO_IMAGE is up to date"
fi

# --- service images (PostgreSQL, Redis) from Debian packages ---------------
bash scripts/service-images.sh

# --- previewd --------------------------------------------------------------
if [ "${PREVIEWD_SKIP_BUILD:-}" = 1 ]; then
    log "skipping cargo build (PREVIEWD_SKIP_BUILD=1)"
else
    log "cargo build --release"
    cargo build --release
fi
