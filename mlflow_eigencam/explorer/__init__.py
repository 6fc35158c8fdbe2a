"""The EigenCAM explorer: the same samples across runs, epochs and experiments, in a live page.

``mlflow-eigencam ui --tracking-uri URI`` serves it (:func:`serve`); inside a team's tracking
server, ``mlflow server --app-name eigencam`` serves it at ``/eigencam/`` next to the MLflow
UI (:func:`create_app`, registered as an ``mlflow.app`` entry point), and
``mlflow server --app-name eigencam-basic-auth`` serves it there behind MLflow's basic-auth
(:func:`create_basic_auth_app`). It only reads what
:class:`~mlflow_eigencam.logger.EigenCAMLogger` wrote; see ``docs/explorer.md`` for the page
and its URL parameters.
"""

from __future__ import annotations

import socketserver
import signal
import sys
import threading
from typing import Any, Optional, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ._hosts import HostCheck, allowed_hosts
from ._server import Explorer

__all__ = ["Explorer", "create_app", "create_basic_auth_app", "make_server_for", "serve"]

#: Where ``mlflow server --app-name eigencam`` serves the explorer.
MOUNT = "/eigencam"


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow image download never keeps Ctrl-C waiting
    allow_reuse_address = True
    explorer: Explorer  # the app behind the host check
    hosts: HostCheck


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass


def make_server_for(tracking_uri: Optional[str], host: str = "127.0.0.1", port: int = 5050,
                    *, mlflow_ui: Optional[str] = None, hosts: Sequence[str] = ()):
    """A threaded WSGI server for the explorer (not started; call ``serve_forever``).

    It answers only requests whose ``Host`` names an address it listens on (127.0.0.1,
    localhost, [::1], ``host``; with its port) or one of ``hosts`` (``NAME``, ``NAME:PORT``,
    patterns with ``*``; ``"*"``: any): 403 otherwise, against DNS rebinding.

    Raises:
        FileNotFoundError, ValueError: A tracking URI that is not a store (one clear line).
        ConnectionError: The address cannot be bound (the port is taken).
    """
    import mlflow

    app = Explorer(str(tracking_uri or mlflow.get_tracking_uri()), mlflow_ui=mlflow_ui)
    try:
        server = make_server(host, int(port), app, server_class=_ThreadingServer,
                             handler_class=_QuietHandler)
    except OSError as exc:  # port taken, address not ours: one line, not a traceback
        raise ConnectionError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                              f"pass another --port") from exc
    # The port is known once bound (port 0: the system's choice).
    server.explorer = app
    server.hosts = HostCheck(app, allowed_hosts(host, server.server_port, hosts))
    server.set_app(server.hosts)
    return server


#: Request threads of ``mlflow-eigencam ui``'s one server process: a page asks for a
#: screenful of images at once, and a slow download holds only its own thread.
THREADS = 16


def serve(tracking_uri: Optional[str] = None, host: str = "127.0.0.1", port: int = 5050, *,
          mlflow_ui: Optional[str] = None, hosts: Sequence[str] = (),
          server: Optional[str] = None) -> None:
    """Serve the explorer until interrupted (binds to 127.0.0.1 unless told otherwise;
    ``hosts``: see :func:`make_server_for`).

    It runs on a production WSGI server that MLflow itself installs: gunicorn (one process,
    :data:`THREADS` threads) where it is installed (MLflow requires it off Windows), else
    waitress (MLflow's on Windows), else the standard library's threaded server. ``server``
    (``"gunicorn"``, ``"waitress"``, ``"stdlib"``) picks one.
    """
    import importlib.util

    if server is None:
        server = next((name for name in ("gunicorn", "waitress")
                       if importlib.util.find_spec(name) is not None and
                       (name != "gunicorn" or sys.platform != "win32")), "stdlib")
    if server not in ("gunicorn", "waitress", "stdlib"):
        raise ValueError(f"server must be 'gunicorn', 'waitress' or 'stdlib', got {server!r}")
    # The address is bound here whichever server runs: a port that is taken is one line.
    httpd = make_server_for(tracking_uri, host, port, mlflow_ui=mlflow_ui, hosts=hosts)
    where = f"http://{host or '0.0.0.0'}:{httpd.server_port}/"
    if host in ("", "0.0.0.0", "::"):
        where += " (every address of this machine: anyone who can reach it can read the runs)"
    print(f"EigenCAM explorer for {httpd.explorer.reader.uri} at {where} (Ctrl-C stops it)",
          flush=True)
    if "*" not in httpd.hosts.allowed:
        print(f"answering Host {', '.join(httpd.hosts.allowed)} (--allowed-hosts adds names)",
              flush=True)
    if server == "gunicorn":
        return _gunicorn(httpd, mlflow_ui)
    if server == "waitress":
        return _waitress(httpd)
    _serve_stdlib(httpd)


def _serve_stdlib(server: "_ThreadingServer") -> None:
    """The standard library's threaded server (where neither gunicorn nor waitress is)."""
    # SIGTERM (a job scheduler's or `kill`'s stop) stops it like Ctrl-C. SIGINT keeps the
    # disposition the process was started with: under `nohup` or `&` in a script it is
    # ignored, and SIGTERM is the way to stop it.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _gunicorn(httpd: "_ThreadingServer", mlflow_ui: Optional[str]) -> None:
    """gunicorn on the socket ``httpd`` bound: one worker process (the explorer's caches
    live in it) with :data:`THREADS` threads (``gthread``); SIGTERM and Ctrl-C stop it."""
    from gunicorn.app.base import BaseApplication

    uri, allowed = httpd.explorer.reader.uri, httpd.hosts.allowed

    class _App(BaseApplication):
        def load_config(self) -> None:
            for key, value in {"bind": [f"fd://{httpd.socket.fileno()}"], "workers": 1,
                               "worker_class": "gthread", "threads": THREADS,
                               # A worker's heartbeat, not a request's limit (gthread): a
                               # slow download is never cut; Ctrl-C waits 5 s at most.
                               "timeout": 120, "graceful_timeout": 5, "keepalive": 5,
                               "loglevel": "warning", "accesslog": None}.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            # Made in the worker: no store connection or thread crosses the fork.
            return HostCheck(Explorer(uri, mlflow_ui=mlflow_ui), allowed)

    # The explorer checked the URI above; the worker opens its own.
    httpd.explorer = None  # type: ignore[assignment]
    import os

    master = os.getpid()
    try:
        _App().run()
    except SystemExit as exc:  # gunicorn ends with sys.exit, 0 after SIGTERM / Ctrl-C
        if os.getpid() != master:  # the worker's own end (it runs this stack too, forked)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code if isinstance(exc.code, int) else 0)
        if exc.code not in (0, None):
            raise
    finally:
        try:
            httpd.server_close()
        except OSError:  # gunicorn closed the socket it was given
            pass
    print("stopped", file=sys.stderr)


def _waitress(httpd: "_ThreadingServer") -> None:
    """waitress (MLflow's server on Windows) on the address ``httpd`` was bound to."""
    import waitress

    host, port = httpd.server_address[:2]
    app = httpd.hosts
    httpd.server_close()
    try:
        waitress.serve(app, host=host, port=port, threads=THREADS, ident="mlflow-eigencam")
    except KeyboardInterrupt:
        pass
    print("stopped", file=sys.stderr)


def create_app(app: Any = None) -> Any:
    """``mlflow.app`` entry point: MLflow's Flask app with the explorer at ``/eigencam/``.

    Used as ``mlflow server --app-name eigencam``; the explorer reads through the server's
    own tracking store and artifact storage (never through an address taken from a request),
    so it sees what the UI sees; its run links are relative to the page. Returns what
    MLflow's server expects: the Flask app, or under uvicorn (MLflow's default) the FastAPI
    app wrapping it, as MLflow's own ``basic-auth`` app does.
    """
    import os

    app = _mount(app, gated=False)
    if os.environ.get("_MLFLOW_SGI_NAME") == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app


def create_basic_auth_app(app: Any = None) -> Any:
    """``mlflow.app`` entry point: MLflow's ``basic-auth`` app with the explorer at
    ``/eigencam/`` behind its authentication.

    Used as ``mlflow server --app-name eigencam-basic-auth`` (MLflow's auth configuration:
    ``MLFLOW_AUTH_CONFIG_PATH``, ``MLFLOW_FLASK_SERVER_SECRET_KEY``, the admin's password).
    Every explorer route asks for the same credentials as MLflow's own (401 without them); a
    user who is not an admin is shown only the runs of experiments they may read. Returns
    what ``mlflow.server.auth.create_app`` returns (the FastAPI app under uvicorn).
    """
    from mlflow.server.auth import create_app as create_auth_app

    return create_auth_app(_mount(app, gated=True))


def _mount(app: Any, *, gated: bool) -> Any:
    """MLflow's Flask app (``app``, default the server's) with the explorer at MOUNT, behind
    :class:`~._auth.AuthGate` when ``gated``."""
    import os

    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    from ._inside import server_reader

    if app is None:
        from mlflow.server import app as flask_app

        app = flask_app
    # The MLflow UI from the explorer's page (MOUNT/): one folder up, under the server's
    # --static-prefix when it has one. Relative, so right behind any proxy.
    from mlflow.server.handlers import STATIC_PREFIX_ENV_VAR

    prefix = os.environ.get(STATIC_PREFIX_ENV_VAR, "").strip("/")
    explorer: Any = Explorer(mlflow_ui=f"../{prefix}", reader=server_reader)
    if gated:
        from ._auth import AuthGate

        explorer = AuthGate(explorer, app)
    app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {MOUNT: explorer})
    return app
