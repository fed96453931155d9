#!/bin/sh
# Entrypoint of previewd-postgres:15 (built by scripts/service-images.sh), after the official
# image's: as root it hands $PGDATA to postgres if it is someone else's (CHOWN, FOWNER,
# DAC_OVERRIDE) and switches to postgres (SETUID, SETGID); as postgres it initialises an empty $PGDATA with
# POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required unless
# POSTGRES_HOST_AUTH_METHOD=trust) and POSTGRES_DB (default $POSTGRES_USER), then execs postgres.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
export PGDATA

log() { echo "entrypoint: $*" >&2; }

# `docker run image -c fsync=off` means postgres with those options.
case "${1:-}" in -*) set -- postgres "$@" ;; esac
[ "${1:-}" = postgres ] || exec "$@"

if [ "$(id -u)" = 0 ]; then
    # Only what is not postgres's yet is changed: a data directory that is (the image's own, a
    # fresh named volume) needs no capability but SETUID and SETGID, for setpriv.
    mkdir -p "$PGDATA"
    [ "$(stat -c %U "$PGDATA")" = postgres ] || chown -R postgres:postgres "$PGDATA"
    [ "$(stat -c %a "$PGDATA")" = 700 ] || chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    POSTGRES_USER=${POSTGRES_USER:-postgres}
    POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
    auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
        log "POSTGRES_PASSWORD is not set: set it (or POSTGRES_HOST_AUTH_METHOD=trust, which lets anyone in)"
        exit 1
    fi
    log "initialising $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
        --auth-host="$auth" --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    printf 'host all all all %s\n' "$auth" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        # A server on the socket only, so no client sees it before the database exists.
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        psql -v ON_ERROR_STOP=1 -q --username="$POSTGRES_USER" --dbname=postgres \
            --set=db="$POSTGRES_DB" <<'SQL'
CREATE DATABASE :"db";
SQL
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    log "initialised"
fi

exec "$@"
