#!/usr/bin/env bash
# Installs previewd as a systemd service driving the system's nginx and Docker. Idempotent: a
# second run changes nothing, and files you edit are never overwritten.
#
#   scripts/install.sh [--root DIR] [--bin PATH]      install (or upgrade)
#   scripts/install.sh [--root DIR] --uninstall       remove it again
#
# What goes where (files marked * are yours once installed: if you changed one, the shipped
# version is written beside it as <name>.new and yours stays):
#   /usr/local/bin/previewd                          target/release/previewd (cargo build --release if missing)
#   /etc/systemd/system/previewd.service             systemd/previewd.service (change it with a drop-in:
#                                                    systemctl edit previewd)
#   /etc/previewd/config.yml *                       systemd/config.production.yml
#   /etc/previewd/vhost.conf.tera *                  templates/vhost.conf.tera
#   /etc/previewd/previewd.env                       systemd/previewd.env.example, mode 0600, only if absent
#   /etc/nginx/conf.d/previewd.conf *                systemd/nginx/previewd-http.conf
#   /etc/nginx/sites-available/previewd-wildcard.conf *      and its link in sites-enabled (first install only)
#   /etc/nginx/sites-available/previewd-wildcard-tls.conf *  not enabled (README, "TLS")
#   /var/lib/previewd                                state_dir, mode 0750
#
# --root DIR (or DESTDIR=DIR) installs under DIR instead of /, for tests and packaging: paths
# inside the installed files stay the final ones, and neither systemctl nor nginx is run.
# --bin PATH installs that binary instead of target/release/previewd.
# --uninstall stops and removes all of the above and the vhosts previewd wrote, except
# /etc/previewd and /var/lib/previewd (your config, secrets and state), and tells you how to
# remove the preview containers, which keep running.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: WARNING: %s\n' "$*" >&2; }
die() { printf 'install: ERROR: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

ROOT=${DESTDIR:-}
BIN_SRC=
UNINSTALL=
while [ $# -gt 0 ]; do
    case $1 in
        --root) [ -n "${2:-}" ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#--root=}; [ -n "$ROOT" ] || die "--root needs a directory"; shift ;;
        --bin) [ $# -ge 2 ] || die "--bin needs a path"; BIN_SRC=$2; shift 2 ;;
        --bin=*) BIN_SRC=${1#--bin=}; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=
fi
# Acting on this machine (not a staging directory): systemctl and nginx are ours to call.
LIVE=
[ -n "$ROOT" ] || LIVE=1
if [ -n "$LIVE" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0), or use --root DIR to install into a directory"
fi
# systemd is PID 1 (sd_booted(3) checks this directory).
SYSTEMD=
[ -n "$LIVE" ] && [ -d /run/systemd/system ] && SYSTEMD=1

BIN=/usr/local/bin/previewd
UNIT=/etc/systemd/system/previewd.service
ETC=/etc/previewd
CONFIG=$ETC/config.yml
TEMPLATE=$ETC/vhost.conf.tera
ENV_FILE=$ETC/previewd.env
NGINX_HTTP=/etc/nginx/conf.d/previewd.conf
AVAILABLE=/etc/nginx/sites-available
ENABLED=/etc/nginx/sites-enabled
WILDCARD=previewd-wildcard.conf
WILDCARD_TLS=previewd-wildcard-tls.conf
STATE=/var/lib/previewd

# ---- helpers ----------------------------------------------------------------------------------
TMP_FILES=()
# shellcheck disable=SC2317 # called by the trap
cleanup() { [ ${#TMP_FILES[@]} -eq 0 ] || rm -f "${TMP_FILES[@]}"; }
trap cleanup EXIT

scratch() {
    local file
    file=$(mktemp "${TMPDIR:-/tmp}/previewd-install.XXXXXX")
    TMP_FILES+=("$file")
    printf '%s\n' "$file"
}

# write SRC DEST MODE: replace DEST with a copy of SRC, atomically (temp file + rename).
write() {
    local src=$1 dest=$ROOT$2 mode=$3 tmp
    mkdir -p "$(dirname "$dest")"
    tmp=$(mktemp "$(dirname "$dest")/.previewd-install.XXXXXX")
    TMP_FILES+=("$tmp")
    cp "$src" "$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
}

# replace SRC DEST MODE: a file previewd owns; installed unless identical. Sets CHANGED=1.
replace() {
    local src=$1 dest=$2 mode=$3
    if [ -f "$ROOT$dest" ] && cmp -s "$src" "$ROOT$dest"; then
        say "up to date: $dest"
    else
        write "$src" "$dest" "$mode"
        say "installed $dest"
        CHANGED=1
    fi
}

# conffile SRC DEST MODE: a file the operator edits. Installed only if absent; if it differs from
# SRC, it is kept and SRC goes beside it as DEST.new. Sets FRESH=1 when it was installed now.
conffile() {
    local src=$1 dest=$2 mode=$3
    FRESH=
    if [ ! -e "$ROOT$dest" ] && [ ! -L "$ROOT$dest" ]; then
        write "$src" "$dest" "$mode"
        say "installed $dest"
        FRESH=1
    elif cmp -s "$src" "$ROOT$dest"; then
        say "up to date: $dest"
    else
        if ! { [ -f "$ROOT$dest.new" ] && cmp -s "$src" "$ROOT$dest.new"; }; then
            write "$src" "$dest.new" "$mode"
        fi
        say "kept your $dest; the shipped version is $dest.new (diff -u $dest $dest.new)"
    fi
}

remove() {
    local path
    for path in "$@"; do
        if [ -e "$ROOT$path" ] || [ -L "$ROOT$path" ]; then
            rm -f "$ROOT$path"
            say "removed $path"
        fi
    done
}

nginx_running() { [ -n "$LIVE" ] && command -v nginx >/dev/null && [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; }

# ---- uninstall ----------------------------------------------------------------------------------
if [ -n "$UNINSTALL" ]; then
    if [ -n "$SYSTEMD" ] && systemctl cat previewd.service >/dev/null 2>&1; then
        say "systemctl disable --now previewd"
        systemctl disable --now previewd.service || warn "could not stop previewd"
    fi
    remove "$UNIT"
    [ -z "$SYSTEMD" ] || systemctl daemon-reload
    remove "$BIN"
    # The vhosts previewd wrote (previewd.<instance>.<slug>.conf and their temp files): without
    # previewd nothing keeps them in step with the containers, and without conf.d/previewd.conf
    # their long names would fail nginx -t. A new previewd writes them again when it starts.
    shopt -s nullglob
    for vhost in "$ROOT$ENABLED"/previewd.*.conf "$ROOT$ENABLED"/.previewd.*.tmp; do
        remove "${vhost#"$ROOT"}"
    done
    shopt -u nullglob
    remove "$ENABLED/$WILDCARD" "$ENABLED/$WILDCARD_TLS" "$AVAILABLE/$WILDCARD" "$AVAILABLE/$WILDCARD.new" \
        "$AVAILABLE/$WILDCARD_TLS" "$AVAILABLE/$WILDCARD_TLS.new" "$NGINX_HTTP" "$NGINX_HTTP.new"
    if nginx_running; then
        if nginx -t 2>/dev/null; then
            nginx -s reload && say "reloaded nginx"
        else
            warn "nginx -t fails now; fix it, then reload nginx: $(nginx -t 2>&1 | tail -n 2)"
        fi
    fi
    say "kept $ETC (config, template, secrets) and $STATE (state); remove them yourself if you want"
    say "preview containers keep running; remove them with:"
    say "  docker rm -f \$(docker ps -aq --filter label=previewd.managed=true)"
    exit 0
fi

# ---- install ------------------------------------------------------------------------------------
if [ -z "$BIN_SRC" ]; then
    BIN_SRC=$REPO/target/release/previewd
    if [ ! -x "$BIN_SRC" ]; then
        command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
        command -v cargo >/dev/null || die "$BIN_SRC is missing and cargo is not installed: build previewd first"
        say "cargo build --release"
        cargo build --release
    fi
fi
[ -x "$BIN_SRC" ] || die "$BIN_SRC is not an executable file"

for file in systemd/previewd.service systemd/config.production.yml systemd/previewd.env.example \
    systemd/nginx/previewd-http.conf systemd/nginx/$WILDCARD systemd/nginx/$WILDCARD_TLS templates/vhost.conf.tera; do
    [ -f "$REPO/$file" ] || die "$REPO/$file is missing"
done

CHANGED=
replace "$BIN_SRC" "$BIN" 0755
BIN_CHANGED=$CHANGED

CHANGED=
replace "$REPO/systemd/previewd.service" "$UNIT" 0644
UNIT_CHANGED=$CHANGED

# In the repository the example names the repository's template (so that check-config passes
# there); installed, it names the copy beside it.
config=$(scratch)
sed 's|^  template: \.\./templates/vhost\.conf\.tera$|  template: vhost.conf.tera|' \
    "$REPO/systemd/config.production.yml" >"$config"
grep -q '^  template: vhost\.conf\.tera$' "$config" ||
    die "systemd/config.production.yml: no 'template: ../templates/vhost.conf.tera' line to point at $TEMPLATE"
[ -d "$ROOT$ETC" ] || { mkdir -p "$ROOT$ETC" && chmod 0755 "$ROOT$ETC"; }
conffile "$config" "$CONFIG" 0640
conffile "$REPO/templates/vhost.conf.tera" "$TEMPLATE" 0644
if [ -e "$ROOT$ENV_FILE" ]; then
    say "up to date: $ENV_FILE (yours; never replaced)"
else
    write "$REPO/systemd/previewd.env.example" "$ENV_FILE" 0600
    say "installed $ENV_FILE (mode 0600)"
fi

# server_names_hash_bucket_size may be set once per http block: not twice.
bucket_elsewhere=
for conf in "$ROOT/etc/nginx/nginx.conf" "$ROOT"/etc/nginx/conf.d/*.conf; do
    if [ "$conf" != "$ROOT$NGINX_HTTP" ] && [ -f "$conf" ] &&
        grep -Eq '^[[:space:]]*server_names_hash_bucket_size' "$conf"; then
        bucket_elsewhere=${conf#"$ROOT"}
    fi
done
if [ -z "$bucket_elsewhere" ]; then
    conffile "$REPO/systemd/nginx/previewd-http.conf" "$NGINX_HTTP" 0644
elif [ -e "$ROOT$NGINX_HTTP" ]; then
    warn "$bucket_elsewhere and $NGINX_HTTP both set server_names_hash_bucket_size: keep one (at least 256)"
else
    warn "$bucket_elsewhere sets server_names_hash_bucket_size: not installing $NGINX_HTTP; make sure it is at least 256"
fi

conffile "$REPO/systemd/nginx/$WILDCARD" "$AVAILABLE/$WILDCARD" 0644
wildcard_fresh=$FRESH
conffile "$REPO/systemd/nginx/$WILDCARD_TLS" "$AVAILABLE/$WILDCARD_TLS" 0644
# Enabled on the first install only, so that a site you disabled (or swapped for the TLS one)
# stays that way.
if [ -n "$wildcard_fresh" ] && [ ! -e "$ROOT$ENABLED/$WILDCARD" ] && [ ! -L "$ROOT$ENABLED/$WILDCARD" ] &&
    [ ! -e "$ROOT$ENABLED/$WILDCARD_TLS" ] && [ ! -L "$ROOT$ENABLED/$WILDCARD_TLS" ]; then
    mkdir -p "$ROOT$ENABLED"
    ln -s "../sites-available/$WILDCARD" "$ROOT$ENABLED/$WILDCARD"
    say "enabled $ENABLED/$WILDCARD"
fi

if [ ! -d "$ROOT$STATE" ]; then
    mkdir -p "$ROOT$STATE"
    chmod 0750 "$ROOT$STATE"
    say "created $STATE"
fi

[ -n "$LIVE" ] || { say "installed under $ROOT; systemctl and nginx were not run"; exit 0; }

# ---- on this machine ---------------------------------------------------------------------------
status=0
if [ -n "$SYSTEMD" ]; then
    systemctl daemon-reload
    say "systemctl daemon-reload"
else
    warn "systemd is not running (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)): the unit is installed but cannot run here"
fi
if command -v nginx >/dev/null; then
    if out=$(nginx -t 2>&1); then
        say "nginx -t: ok"
    else
        warn "nginx -t fails, so previewd could not reload nginx either:"$'\n'"$out"
        status=1
    fi
else
    warn "nginx is not installed (apt-get install nginx)"
fi
# shellcheck disable=SC1090 # the operator's secrets file, as systemd's EnvironmentFile= reads it
if ! out=$(set -a && . "$ENV_FILE" && set +a && "$BIN" check-config --config "$CONFIG" 2>&1); then
    warn "$CONFIG has problems:"$'\n'"$out"
    status=1
fi
# The whole deployment, end to end (Docker, images, nginx serving a probe vhost, DNS, GitHub,
# ports). A first install still has preview.example.com and no secrets, so its failures are
# reported, not fatal: they are the list of what to do next.
if [ -n "$LIVE" ]; then
    say "previewd doctor --config $CONFIG:"
    # shellcheck disable=SC1090 # as above
    (set -a && . "$ENV_FILE" && set +a && "$BIN" doctor --config "$CONFIG") 2>&1 | sed 's/^/  /' || true
else
    say "installed under $ROOT: on the server, run $BIN doctor --config $CONFIG"
fi
if [ -n "$SYSTEMD" ] && systemctl is-active --quiet previewd.service && [ -n "$BIN_CHANGED$UNIT_CHANGED" ]; then
    say "previewd is running the previous version: systemctl restart previewd"
fi

cat <<EOF

Next steps:
  1. $CONFIG: base_domain, users (make a hash: $BIN hash-password), images;
     then: $BIN check-config --config $CONFIG
  2. $AVAILABLE/$WILDCARD: replace preview.example.com; then: nginx -t && systemctl reload nginx
     (for HTTPS: $AVAILABLE/$WILDCARD_TLS, see the comments at its top)
  3. Pull-request previews: secrets in $ENV_FILE, then uncomment github: in $CONFIG
  4. systemctl enable --now previewd && journalctl -u previewd -f
Remove it again: $0 --uninstall (keeps $ETC and $STATE)
EOF
exit "$status"
