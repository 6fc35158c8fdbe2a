"""A delaying HTTP proxy on 127.0.0.1: every response of a real server, late.

``DelayProxy(upstream_port, delay=(2.0, 5.0), seed=0)`` forwards each request to
``127.0.0.1:upstream_port`` and holds its response for a delay drawn per response (uniform in
``delay``, seeded) or fixed (``delay=2.0``). Requests are served concurrently (one thread
each), as a slow server behind a network does; ``/health`` is delayed like the API unless
``fast_health``. Used by
the slow-server test and ``benchmarks/bench_slow_server.py``.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Tuple, Union

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-connection", "content-length"}


class DelayProxy:
    """Start on construction; ``uri`` is where to point the client; ``stop()`` ends it."""

    def __init__(self, upstream_port: int, delay: Union[float, Tuple[float, float]] = 2.0,
                 seed: int = 0, fast_health: bool = False) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.fast_health = fast_health
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.requests = 0
        self.max_concurrent = 0
        self._active = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                proxy._enter()
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else None
                    wait = 0.0 if proxy.fast_health and self.path == "/health" else \
                        proxy._next_delay()
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port,
                                                      timeout=120)
                    try:
                        headers = {k: v for k, v in self.headers.items()
                                   if k.lower() not in _HOP}
                        conn.request(self.command, self.path, body=body, headers=headers)
                        resp = conn.getresponse()
                        data = resp.read()
                        status, reason, out = resp.status, resp.reason, resp.getheaders()
                    finally:
                        conn.close()
                    time.sleep(wait)
                    self.send_response(status, reason)
                    for k, v in out:
                        if k.lower() not in _HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    self.close_connection = True
                finally:
                    proxy._leave()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="delay-proxy")
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _next_delay(self) -> float:
        if isinstance(self.delay, tuple):
            with self._rng_lock:
                return self._rng.uniform(*self.delay)
        return float(self.delay)

    def _enter(self) -> None:
        with self._rng_lock:
            self.requests += 1
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)

    def _leave(self) -> None:
        with self._rng_lock:
            self._active -= 1

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
