#!/usr/bin/env python3
"""Paced HTTP GET load through nginx for scripts/bench.py, counting what a visitor would see.

Usage: bench-load.py HOST PORT RATE SECONDS MODE STOPFILE
  MODE keepalive: a few persistent connections, as a browser keeps them. When a server closes an
       idle kept-alive connection just as the next request goes out (nginx does so to every idle
       connection of the workers a reload retires), the request is sent again once on a new
       connection, as browsers do; those are counted as `resent`.
  MODE fresh: one new connection per request.
Runs until SECONDS pass or STOPFILE exists; prints one line:
  requests=N ok=N failed=N resent=N rate=R statuses=CODE:N,...
`failed` counts non-2xx answers and requests that got no answer even when resent.
"""
import http.client
import os
import sys
import threading
import time
from collections import Counter

CONNECTIONS = 4
# What a kept-alive connection closed by the server looks like to the client.
CLOSED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)


def main():
    host, port, rate, seconds, mode, stopfile = sys.argv[1:7]
    port, rate, seconds = int(port), float(rate), float(seconds)
    statuses, lock = Counter(), threading.Lock()
    counts = Counter()
    deadline = time.monotonic() + seconds
    interval = CONNECTIONS / rate

    def record(key, n=1):
        with lock:
            counts[key] += n

    def worker(offset):
        conn = None
        next_at = time.monotonic() + offset
        while time.monotonic() < deadline and not os.path.exists(stopfile):
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            status, conn = request(host, port, conn, mode == "keepalive", record)
            with lock:
                statuses[status] += 1

    threads = [threading.Thread(target=worker, args=(i * interval / CONNECTIONS,)) for i in range(CONNECTIONS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    total = sum(statuses.values())
    ok = sum(n for s, n in statuses.items() if isinstance(s, int) and 200 <= s < 300)
    print(
        f"requests={total} ok={ok} failed={total - ok} resent={counts['resent']} rate={total / elapsed:.1f} "
        + "statuses=" + ",".join(f"{s}:{n}" for s, n in sorted(statuses.items(), key=str))
    )


def request(host, port, conn, keepalive, record):
    """One GET; returns (status or error name, the connection to reuse)."""
    reused = conn is not None
    for attempt in (1, 2):
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/", headers={"Host": host, "Connection": "keep-alive" if keepalive else "close"})
            response = conn.getresponse()
            response.read()
            if not keepalive or response.will_close:
                conn.close()
                conn = None
            return response.status, conn
        except CLOSED as err:
            conn.close()
            conn = None
            if not (keepalive and reused and attempt == 1):
                return type(err).__name__, None
            record("resent")
            reused = False
        except OSError as err:
            conn.close()
            return type(err).__name__, None
    return "unreachable", None


if __name__ == "__main__":
    main()
