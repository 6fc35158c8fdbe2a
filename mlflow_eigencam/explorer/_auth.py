"""The explorer behind MLflow's ``basic-auth``: ``mlflow server --app-name eigencam-basic-auth``.

MLflow's server takes one ``--app-name``. This one is MLflow's basic-auth app (its users,
its permissions, its admin pages) with the explorer mounted at ``/eigencam/`` behind the same
authentication: every explorer route (the page, its API, its images) asks the request's
credentials of the configured ``authorization_function`` (basic auth by default), as MLflow's
own routes do, and answers 401 without them. A user who is not an admin sees only the runs of
the experiments they may read (their permission on the experiment, else the configured
``default_permission``): the explorer's own routes are not MLflow's REST routes, so MLflow's
before-request check never sees them and this gate is their check.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable

from ._server import MAY_READ

__all__ = ["AuthGate"]

StartResponse = Callable[..., Any]


class AuthGate:
    """WSGI middleware: the request authenticated by MLflow's basic-auth app, then the
    explorer with ``environ[MAY_READ]`` set to the user's read permission per experiment
    (absent for an admin, who reads everything).

    Args:
        app: The explorer (a WSGI application).
        flask_app: MLflow's Flask app, whose request context the auth functions read.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], flask_app: Any) -> None:
        from mlflow.server import auth

        if not hasattr(auth, "_get_experiment_permission"):
            raise RuntimeError("this MLflow's basic-auth app has no per-experiment permission "
                               "lookup (mlflow.server.auth._get_experiment_permission): the "
                               "explorer cannot check what a user may read; upgrade MLflow")
        self.app = app
        self.flask_app = flask_app

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        from mlflow.server import auth
        from werkzeug.wrappers import Response

        # The auth functions read Flask's request (its Authorization header): give them one.
        with self.flask_app.request_context(environ):
            found = auth.authenticate_request()
            if isinstance(found, Response):  # 401 with WWW-Authenticate, as MLflow answers
                return found(environ, start_response)
            username = getattr(found, "username", None)
            if not username:
                return auth.make_basic_auth_response()(environ, start_response)
            user = auth.store.get_user(username)
            if user.is_admin:
                environ.pop(MAY_READ, None)
            else:
                environ[MAY_READ] = _may_read(auth, username)
            # Inside the context: the permission lookups run while the explorer answers.
            return list(self.app(environ, start_response))


def _may_read(auth: Any, username: str) -> Callable[[str], bool]:
    """``may_read(experiment_id)`` for one request (each experiment looked up once)."""
    seen: Dict[str, bool] = {}

    def may_read(experiment_id: str) -> bool:
        if experiment_id not in seen:
            try:
                seen[experiment_id] = bool(
                    auth._get_experiment_permission(experiment_id, username).can_read)
            except Exception:  # a lookup that fails denies (never a reason to show a run)
                seen[experiment_id] = False
        return seen[experiment_id]

    return may_read
