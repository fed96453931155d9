"""The shop demo app of previewd's whole environments (image previewd-shop:demo, built by
scripts/service-images.sh): products in PostgreSQL, a visit counter in Redis, reviews once
migrate.py has run. Standard library HTTP server, python3-psycopg2 and python3-redis only.

Environment: DATABASE_URL (postgres://user:pass@host:port/db), REDIS_URL (redis://host:port/n),
PORT (default 5000), PREVIEW_NAME (shown, optional).

  GET  /healthz    200 "ok" when PostgreSQL and Redis both answer, else 503 and the reason
  GET  /           an HTML page: product count, first 20 products, reviews, visits (+1)
  GET  /api/state  JSON: products, first, migrated, reviews, visits, preview
  POST /products   form name=...&price=... -> 201 {"id": n}, 400 for a bad field

Every request opens its own database connection: simplicity over speed.
"""

import contextlib
import decimal
import html
import json
import os
import signal
import sys
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg2
import redis

MAX_BODY = 16 * 1024
MAX_NAME = 200
MAX_PRICE = decimal.Decimal("99999999.99")  # numeric(10,2)


def log(message):
    print(f"shop: {message}", file=sys.stderr)


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def require_env(name):
    value = os.environ.get(name, "")
    if not value:
        log(f"{name} is not set")
        sys.exit(2)
    return value


DATABASE_URL = require_env("DATABASE_URL")
try:
    REDIS = redis.Redis.from_url(
        require_env("REDIS_URL"), socket_connect_timeout=3, socket_timeout=3, decode_responses=True
    )
except ValueError as error:
    log(f"REDIS_URL is not a redis:// URL: {error}")
    sys.exit(2)
PREVIEW_NAME = os.environ.get("PREVIEW_NAME") or None


@contextlib.contextmanager
def database():
    """A new connection, in a transaction committed on success, closed in any case."""
    connection = psycopg2.connect(
        DATABASE_URL,
        connect_timeout=3,
        application_name="previewd-shop",
        options="-c statement_timeout=5000",
    )
    try:
        with connection, connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def one(cursor, sql, args=()):
    cursor.execute(sql, args)
    return cursor.fetchone()[0]


def migrated(cursor):
    return one(cursor, "SELECT to_regclass('public.reviews') IS NOT NULL")


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def form_field(form, name):
    values = form.get(name, [])
    if len(values) != 1:
        raise BadRequest(400, f"{name} is missing" if not values else f"{name} is given more than once")
    return values[0]


def parse_product(body):
    try:
        form = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest(400, "the form is not UTF-8") from None
    name = form_field(form, "name").strip()
    if not name or len(name) > MAX_NAME:
        raise BadRequest(400, f"name must be 1 to {MAX_NAME} characters")
    raw = form_field(form, "price")
    try:
        price = decimal.Decimal(raw.strip())
    except decimal.InvalidOperation:
        price = None
    if price is None or not price.is_finite() or not 0 <= price <= MAX_PRICE or price.as_tuple().exponent < -2:
        raise BadRequest(400, f"price must be a number from 0 to {MAX_PRICE} with at most 2 decimals, not {raw!r}")
    return name, price


class Handler(BaseHTTPRequestHandler):
    server_version = "previewd-shop"

    def version_string(self):
        return self.server_version

    def send(self, status, body, content_type="text/plain; charset=utf-8", headers=()):
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status, value):
        self.send(status, json.dumps(value) + "\n", "application/json")

    def route(self, routes):
        path = urllib.parse.urlsplit(self.path).path
        method = self.command
        handler = routes.get((method, path))
        if handler is None:
            allowed = sorted(m for (m, p) in ROUTES if p == path)
            if allowed:
                self.send(405, f"{method} is not allowed on {path}\n", headers=[("Allow", ", ".join(allowed))])
            else:
                self.send(404, f"no such page: {path}\n")
            return
        try:
            handler(self)
        except BadRequest as error:
            self.send(error.status, f"{error}\n")
        except psycopg2.Error as error:
            log(f"{method} {path}: postgres: {first_line(error)}")
            self.send(500, f"database error: {first_line(error)}\n")
        except redis.RedisError as error:
            log(f"{method} {path}: redis: {first_line(error)}")
            self.send(500, f"redis error: {first_line(error)}\n")
        except Exception:
            log(f"{method} {path}: {traceback.format_exc()}")
            self.send(500, "internal error\n")

    def do_GET(self):
        self.route(ROUTES)

    def do_POST(self):
        self.route(ROUTES)

    def healthz(self):
        problems = []
        try:
            with database() as cursor:
                one(cursor, "SELECT 1")
        except psycopg2.Error as error:
            problems.append(f"postgres: {first_line(error)}")
        try:
            REDIS.ping()
        except redis.RedisError as error:
            problems.append(f"redis: {first_line(error)}")
        if problems:
            self.send(503, "; ".join(problems) + "\n")
        else:
            self.send(200, "ok\n")

    def index(self):
        with database() as cursor:
            count = one(cursor, "SELECT count(*) FROM products")
            cursor.execute("SELECT name, price FROM products ORDER BY id LIMIT 20")
            products = cursor.fetchall()
            reviews = None
            if migrated(cursor):
                cursor.execute(
                    "SELECT p.name, r.body FROM reviews r LEFT JOIN products p ON p.id = r.product_id "
                    "ORDER BY r.id LIMIT 100"
                )
                reviews = cursor.fetchall()
        visits = REDIS.incr("visits")

        e = html.escape
        lines = [
            "<!doctype html>",
            '<html><head><meta charset="utf-8"><title>previewd shop</title></head><body>',
            "<h1>previewd shop</h1>",
        ]
        if PREVIEW_NAME:
            lines.append(f"<p>Preview: {e(PREVIEW_NAME)}</p>")
        lines.append(f"<p>{e(str(count))} products. The first {e(str(len(products)))}:</p>")
        lines.append("<table><tr><th>name</th><th>price</th></tr>")
        lines.extend(f"<tr><td>{e(name)}</td><td>{e(str(price))}</td></tr>" for name, price in products)
        lines.append("</table>")
        lines.append("<h2>Reviews</h2>")
        if reviews is None:
            lines.append("<p>migration not applied</p>")
        elif not reviews:
            lines.append("<p>no reviews yet</p>")
        else:
            lines.append("<ul>")
            lines.extend(f"<li>{e(name or '(no product)')}: {e(body)}</li>" for name, body in reviews)
            lines.append("</ul>")
        lines.append(f"<p>Visits: {e(str(visits))}</p>")
        lines.append("</body></html>")
        self.send(200, "\n".join(lines) + "\n", "text/html; charset=utf-8")

    def state(self):
        with database() as cursor:
            count = one(cursor, "SELECT count(*) FROM products")
            cursor.execute("SELECT name FROM products ORDER BY id LIMIT 5")
            first = [name for (name,) in cursor.fetchall()]
            is_migrated = migrated(cursor)
            reviews = one(cursor, "SELECT count(*) FROM reviews") if is_migrated else None
        visits = int(REDIS.get("visits") or 0)
        self.send_json(
            200,
            {
                "products": count,
                "first": first,
                "migrated": is_migrated,
                "reviews": reviews,
                "visits": visits,
                "preview": PREVIEW_NAME,
            },
        )

    def add_product(self):
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise BadRequest(415, "send the product as a form (application/x-www-form-urlencoded)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest(411, "Content-Length is required") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest(413, f"the form is limited to {MAX_BODY} bytes")
        name, price = parse_product(self.rfile.read(length))
        with database() as cursor:
            product = one(cursor, "INSERT INTO products (name, price) VALUES (%s, %s) RETURNING id", (name, price))
        self.send_json(201, {"id": product})


ROUTES = {
    ("GET", "/healthz"): Handler.healthz,
    ("GET", "/"): Handler.index,
    ("GET", "/api/state"): Handler.state,
    ("POST", "/products"): Handler.add_product,
}


def main():
    try:
        port = int(os.environ.get("PORT") or 5000)
    except ValueError:
        log(f"PORT is not a number: {os.environ['PORT']!r}")
        sys.exit(2)
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    # As PID 1 in a container, SIGTERM has no default action: without this, docker stop waits
    # out its timeout and kills.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log(f"listening on 0.0.0.0:{port}" + (f" (preview {PREVIEW_NAME})" if PREVIEW_NAME else ""))
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
