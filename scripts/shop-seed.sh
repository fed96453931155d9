#!/usr/bin/env bash
# Makes the Docker volume shop-db-seed: the PostgreSQL 15 data directory of previewd-postgres:15
# (its $PGDATA layout, owned by postgres, mode 700) with user app, password app, database app and
# a table products (id, name, price) of 10,000 rows, "product 1" to "product 10000". The shop's
# previews start from a copy of it (cp -a into a volume of their own).
# Cached: the volume carries a label with a hash of this script and of the PostgreSQL image's
# inputs; it is left alone when that matches, and removed and made again when it does not (not
# if a container still uses it). Made by running the image on the volume with no network:
# pg_isready and psql by docker exec, then a clean shutdown (docker stop), so a copy starts
# without recovery. Called by scripts/service-images.sh, which builds that image; needs Docker.
set -euo pipefail

SELF=$(realpath "${BASH_SOURCE[0]}")
VOLUME=shop-db-seed
POSTGRES_IMAGE=previewd-postgres:15
LABEL=previewd.seed.hash
ROWS=10000
READY_SECS=60
STOP_SECS=60

log() { echo "shop-seed: $*" >&2; }
die() { echo "shop-seed: ERROR: $*" >&2; exit 1; }

# The image's own hash label covers its package, entrypoint and build script.
image_hash=$(docker image inspect -f '{{ index .Config.Labels "previewd.service.hash" }}' "$POSTGRES_IMAGE" 2>/dev/null) ||
    die "$POSTGRES_IMAGE is missing: run scripts/service-images.sh"
hash=$({ cat "$SELF"; printf '%s\n' "$image_hash" "$ROWS"; } | sha256sum | cut -c1-16)

current=$(docker volume inspect -f "{{ index .Labels \"$LABEL\" }}" "$VOLUME" 2>/dev/null) || current=absent
if [ "$current" = "$hash" ]; then
    log "$VOLUME is up to date"
    exit 0
fi
if [ "$current" != absent ]; then
    users=$(docker ps -a --filter "volume=$VOLUME" --format '{{.Names}}' | paste -sd ' ')
    [ -z "$users" ] || die "$VOLUME is out of date but in use by container(s) $users: remove them and run again"
    log "removing $VOLUME (hash ${current:-none}, now $hash)"
    docker volume rm "$VOLUME" >/dev/null || die "could not remove $VOLUME"
fi

# Until it is complete, the volume is removed on any exit: its label would call it up to date.
container=previewd-shop-seed-$$
complete=
cleanup() {
    docker rm -f "$container" >/dev/null 2>&1 || true
    [ -n "$complete" ] || docker volume rm -f "$VOLUME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

log "making $VOLUME ($ROWS products)"
docker volume create --label "$LABEL=$hash" "$VOLUME" >/dev/null
# The capabilities the official image's entrypoint needs (tests/service_images.rs), no network.
docker run -d --name "$container" --network none \
    --cap-drop ALL --security-opt no-new-privileges \
    --cap-add CHOWN --cap-add SETUID --cap-add SETGID --cap-add FOWNER --cap-add DAC_OVERRIDE \
    -v "$VOLUME:/var/lib/postgresql/data" \
    -e POSTGRES_USER=app -e POSTGRES_PASSWORD=app -e POSTGRES_DB=app \
    "$POSTGRES_IMAGE" >/dev/null

# Over TCP: while the entrypoint initialises, its server listens on the socket only.
deadline=$((SECONDS + READY_SECS))
until docker exec "$container" pg_isready -q -h 127.0.0.1 -U app -d app; do
    state=$(docker inspect -f '{{.State.Status}}' "$container")
    if [ "$state" != running ]; then
        docker logs "$container" 2>&1 | tail -n 20 >&2
        die "PostgreSQL stopped ($state) before it was ready"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        docker logs "$container" 2>&1 | tail -n 20 >&2
        die "PostgreSQL not ready after $READY_SECS s"
    fi
    sleep 0.5
done

# One transaction: the table is there with every row, or not at all. Frozen and analysed, so
# a copy's first reads write no hint bits.
docker exec -i -u postgres "$container" psql -q -v ON_ERROR_STOP=1 -U app -d app --set=rows="$ROWS" <<'SQL' >/dev/null ||
BEGIN;
CREATE TABLE products (id serial primary key, name text not null, price numeric(10,2) not null);
INSERT INTO products (id, name, price)
    SELECT i, 'product ' || i, 1 + (i * 7919 % 10000) / 100.0 FROM generate_series(1, :rows) AS i;
SELECT setval(pg_get_serial_sequence('products', 'id'), :rows);
COMMIT;
VACUUM (FREEZE, ANALYZE) products;
SQL
    die "loading the products failed"
count=$(docker exec -u postgres "$container" psql -tA -U app -d app -c 'SELECT count(*) FROM products')
[ "$count" = "$ROWS" ] || die "products has $count rows, not $ROWS"

# SIGTERM: a smart shutdown, which ends with a checkpoint; the timeout is far beyond it.
docker stop -t "$STOP_SECS" "$container" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
[ "$code" = 0 ] || { docker logs "$container" 2>&1 | tail -n 20 >&2; die "PostgreSQL exited with $code on stop"; }
logs=$(docker logs "$container" 2>&1)
[[ "$logs" == *"database system is shut down"* ]] || die "PostgreSQL did not log a clean shutdown"
docker rm "$container" >/dev/null
complete=1
log "made $VOLUME"
