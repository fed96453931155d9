"""The shop's migration job (image previewd-shop:demo, `python3 migrate.py`): adds the reviews
table and one review of product 1. Idempotent: a second run changes nothing. Runs in one
transaction under an advisory lock, so two runs at once do not race.

Environment: DATABASE_URL (postgres://user:pass@host:port/db). MIGRATE_FAIL, if not empty,
makes it fail on purpose with exit code 3 (tests use it for a failing job). Exit code 1 on any
other failure, with the error on stderr.
"""

import os
import sys

import psycopg2

LOCK = 0x73686F70  # "shop": pg_advisory_xact_lock key


def fail(message, code=1):
    print(message, file=sys.stderr)
    sys.exit(code)


def migrate(cursor):
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK,))
    cursor.execute("SELECT to_regclass('public.reviews') IS NOT NULL")
    if cursor.fetchone()[0]:
        print("table reviews already exists")
    else:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS reviews ("
            "id serial primary key, product_id int references products(id), body text not null)"
        )
        print("created table reviews")
    cursor.execute("SELECT count(*) FROM reviews")
    count = cursor.fetchone()[0]
    if count:
        print(f"reviews has {count} row(s): inserted none")
    else:
        cursor.execute("INSERT INTO reviews (product_id, body) VALUES (1, 'added by the migration')")
        print("inserted the review of product 1")


def main():
    if os.environ.get("MIGRATE_FAIL"):
        fail("migration failed on purpose: MIGRATE_FAIL is set", 3)
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        fail("migration failed: DATABASE_URL is not set")
    try:
        connection = psycopg2.connect(url, connect_timeout=10, application_name="previewd-shop-migrate")
        try:
            with connection, connection.cursor() as cursor:
                migrate(cursor)
        finally:
            connection.close()
    except psycopg2.Error as error:
        fail(f"migration failed: {str(error).strip()}")
    print("migration done")


if __name__ == "__main__":
    main()
