#!/usr/bin/env bash
# Builds the service images previewd's preview environments use, from Debian packages only (this
# machine pulls no images): previewd-postgres:15 (postgresql-15) and previewd-redis:7
# (redis-server), both on one debootstrap'd bookworm root kept as previewd-debian-base:bookworm;
# and the demo app of whole environments, previewd-shop:demo (python3 with psycopg2 and redis,
# the files of scripts/shop/ in /srv/shop). Then scripts/shop-seed.sh makes its seed volume.
# Idempotent and cached: each image carries a label with a hash of its inputs (this script, the
# package, the Debian release, the files it copies in) and is rebuilt only when that differs.
# Needs root, debootstrap and a Docker engine. The mirror is the one apt uses here
# (override: PREVIEWD_DEBIAN_MIRROR).
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
cd "$(dirname "$SELF")/.."
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

RELEASE=bookworm
BASE_IMAGE=previewd-debian-base:$RELEASE
POSTGRES_IMAGE=previewd-postgres:15
REDIS_IMAGE=previewd-redis:7
SHOP_IMAGE=previewd-shop:demo
LABEL=previewd.service.hash
WORK=${TMPDIR:-/var/tmp}
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() { echo "service-images: $*" >&2; }
die() { echo "service-images: ERROR: $*" >&2; exit 1; }

# --- inputs and their hashes -------------------------------------------------
hash_of() { { cat "$SELF"; printf '%s\n' "$@"; } | sha256sum | cut -c1-16; }
entrypoint=scripts/service-images/postgres-entrypoint.sh
base_hash=$(hash_of "$RELEASE")
postgres_hash=$(hash_of "$RELEASE" postgresql-15 "$(sha256sum <"$entrypoint")")
redis_hash=$(hash_of "$RELEASE" redis-server)
shop_files=(scripts/shop/app.py scripts/shop/migrate.py)
shop_hash=$(hash_of "$RELEASE" python3 python3-psycopg2 python3-redis "$(sha256sum "${shop_files[@]}")")

current_hash() { docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }

# The Debian mirror apt is configured with (one-line or deb822 sources), not its security suite.
mirror() {
    if [ -n "${PREVIEWD_DEBIAN_MIRROR:-}" ]; then echo "$PREVIEWD_DEBIAN_MIRROR"; return; fi
    local files=() url
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || die "no apt sources; set PREVIEWD_DEBIAN_MIRROR"
    url=$(sed -n -e 's/^deb \(\[[^]]*\] \)\{0,1\}\([a-z]*:\/\/[^ ]*\) .*/\2/p' \
        -e 's/^URIs: *\([^ ]*\).*/\1/p' "${files[@]}" | grep -v -- '-security' | grep '/debian/\{0,1\}$' | head -n1)
    [ -n "$url" ] || die "no Debian mirror in ${files[*]}; set PREVIEWD_DEBIAN_MIRROR"
    echo "$url"
}

# --- a root directory, mounted for chroot, cleaned up on exit ---------------
roots=() ROOT=
cleanup() {
    local root mnt
    for root in "${roots[@]}"; do
        # Whatever is still mounted inside (an interrupted chroot or debootstrap), deepest first;
        # and rm stays on the root's own filesystem in any case.
        awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/self/mounts | sort -r |
            while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
        rm -rf --one-file-system "$root"
    done
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# Sets ROOT to a new empty directory (not in a subshell, so cleanup knows it).
new_root() {
    ROOT=$(mktemp -d "$WORK/previewd-root.XXXXXX")
    roots+=("$ROOT")
}

# Runs a shell script inside the root, with the host's DNS, /proc and no service starts.
in_root() {
    local root=$1 script=$2
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    mount -t proc proc "$root/proc"
    local rc=0
    chroot "$root" /usr/bin/env -i PATH="$DEFAULT_PATH" DEBIAN_FRONTEND=noninteractive LC_ALL=C \
        /bin/sh -euc "$script" >>"$WORK/previewd-service-images.log" 2>&1 || rc=$?
    umount "$root/proc"
    rm -f "$root/usr/sbin/policy-rc.d"
    : >"$root/etc/resolv.conf"
    [ "$rc" = 0 ] || { tail -n 30 "$WORK/previewd-service-images.log" >&2; die "chroot step failed"; }
}

# What neither image needs at run time: package lists and caches, docs, man pages, translations.
CLEAN='apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old \
    /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* /usr/share/lintian \
    /var/log/* /tmp/* /root/.cache'

# Imports a root directory as an image with the given --change lines, labelled with its hash.
import_root() {
    local root=$1 image=$2 hash=$3
    shift 3
    local changes=() change
    for change in "$@" "LABEL $LABEL=$hash"; do changes+=(--change "$change"); done
    tar --numeric-owner -C "$root" -c . | docker import "${changes[@]}" - "$image" >/dev/null
    docker image prune -f --filter "label=$LABEL" >/dev/null # the image this one replaced
}

# --- the shared base: debootstrap --variant=minbase ---------------------------
build_base() {
    local root url
    url=$(mirror)
    new_root
    root=$ROOT
    log "debootstrap $RELEASE from $url"
    debootstrap --variant=minbase "$RELEASE" "$root" "$url" >>"$WORK/previewd-service-images.log" 2>&1 ||
        { tail -n 30 "$WORK/previewd-service-images.log" >&2; die "debootstrap failed"; }
    printf 'deb %s %s main\ndeb %s %s-updates main\n' "$url" "$RELEASE" "$url" "$RELEASE" \
        >"$root/etc/apt/sources.list"
    in_root "$root" "$CLEAN"
    import_root "$root" "$BASE_IMAGE" "$base_hash" "ENV PATH=$DEFAULT_PATH" 'CMD ["/bin/bash"]'
}

# Sets ROOT to a root made from the base image, for one service's packages.
root_from_base() {
    local id
    new_root
    id=$(docker create "$BASE_IMAGE")
    docker export "$id" | tar --numeric-owner -C "$ROOT" -x
    docker rm "$id" >/dev/null
}

build_postgres() {
    local root
    root_from_base
    root=$ROOT
    cp "$entrypoint" "$root/usr/local/bin/docker-entrypoint.sh"
    chmod 755 "$root/usr/local/bin/docker-entrypoint.sh"
    # No cluster at install time: the entrypoint makes one in $PGDATA on first start.
    in_root "$root" "apt-get update -qq
mkdir -p /etc/postgresql-common
echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf
apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold postgresql-15
install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data
install -d -o postgres -g postgres -m 2775 /var/run/postgresql
$CLEAN"
    import_root "$root" "$POSTGRES_IMAGE" "$postgres_hash" \
        "ENV PATH=/usr/lib/postgresql/15/bin:$DEFAULT_PATH" \
        'ENV PGDATA=/var/lib/postgresql/data' 'ENV LANG=C.UTF-8' \
        'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["postgres"]' 'EXPOSE 5432'
}

build_redis() {
    local root
    root_from_base
    root=$ROOT
    in_root "$root" "apt-get update -qq
apt-get install -y -qq --no-install-recommends redis-server
install -d -o redis -g redis -m 750 /data
$CLEAN"
    import_root "$root" "$REDIS_IMAGE" "$redis_hash" \
        "ENV PATH=$DEFAULT_PATH" 'ENV LANG=C.UTF-8' 'USER redis' 'WORKDIR /data' \
        'CMD ["redis-server", "--protected-mode", "no", "--bind", "0.0.0.0", "--dir", "/data"]' \
        'EXPOSE 6379'
}

# The shop runs as shop, from root-owned files, so it works with --read-only and no capability.
build_shop() {
    local root
    root_from_base
    root=$ROOT
    install -d -m 755 "$root/srv/shop"
    install -m 644 "${shop_files[@]}" "$root/srv/shop/"
    in_root "$root" "apt-get update -qq
apt-get install -y -qq --no-install-recommends python3 python3-psycopg2 python3-redis
useradd --system --user-group --home-dir /srv/shop --no-create-home --shell /usr/sbin/nologin shop
$CLEAN"
    import_root "$root" "$SHOP_IMAGE" "$shop_hash" \
        "ENV PATH=$DEFAULT_PATH" 'ENV LANG=C.UTF-8' 'ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1' \
        'USER shop' 'WORKDIR /srv/shop' 'CMD ["python3", "app.py"]' 'EXPOSE 5000'
}

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot)"
command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
: >"$WORK/previewd-service-images.log"

if [ "$(current_hash "$BASE_IMAGE")" = "$base_hash" ]; then
    log "$BASE_IMAGE is up to date"
else
    log "building $BASE_IMAGE (log: $WORK/previewd-service-images.log)"
    build_base
fi
for service in postgres redis shop; do
    image_var=${service^^}_IMAGE hash_var=${service}_hash
    if [ "$(current_hash "${!image_var}")" = "${!hash_var}" ]; then
        log "${!image_var} is up to date"
    else
        log "building ${!image_var}"
        "build_$service"
    fi
done

bash scripts/shop-seed.sh
