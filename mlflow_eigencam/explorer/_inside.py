"""Reading inside ``mlflow server --app-name eigencam``: through the server's own stores.

The explorer never reads through an address taken from a request: a forged ``Host`` header
(MLflow's host check lets ``127.0.0.1:<any port>`` and private ranges through) would point it
at another server, and behind a TLS-terminating proxy the request's address is not the
server's. It reads the runs from the tracking store the server answers from
(``handlers._get_tracking_store()``) and the artifacts from where the server itself serves
them (``get_artifact_handler``): its ``--artifacts-destination`` for a proxied
(``mlflow-artifacts:``) run root, else the run's own artifact URI.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from .._reader import Reader

__all__ = ["SERVER_NAME", "server_reader"]

#: What messages and the page call the store read inside the server (its backend store URI
#: may hold a database password: it is never shown).
SERVER_NAME = "this MLflow server"


def server_reader() -> Reader:
    """A :class:`Reader` over the running ``mlflow server``'s own tracking store and
    artifact storage (call it inside the server process, once it is configured)."""
    return _ServerReader(SERVER_NAME, client=_server_tracking_client())


def _server_tracking_client() -> Any:
    from mlflow.server import BACKEND_STORE_URI_ENV_VAR
    from mlflow.tracking._tracking_service.client import TrackingServiceClient

    class _ServerTracking(TrackingServiceClient):
        """MLflow's tracking client (``get_run``, ``search_runs``, ... with the same
        arguments as ``MlflowClient``'s) over the store object the server itself uses."""

        @property
        def store(self) -> Any:
            from mlflow.server.handlers import _get_tracking_store

            return _get_tracking_store()

    return _ServerTracking(os.environ.get(BACKEND_STORE_URI_ENV_VAR, ""))


class _ServerReader(Reader):
    def _open_repo(self, artifact_uri: str) -> Any:
        """The run's artifacts as ``mlflow server`` itself serves them."""
        from mlflow.server import ARTIFACTS_DESTINATION_ENV_VAR, handlers

        if handlers._is_servable_proxied_run_artifact_root(artifact_uri):
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            # A repository rooted at the run's folder under --artifacts-destination, as the
            # server builds one for a trace: listings then give run-relative paths.
            folder = handlers._get_proxied_run_artifact_destination_path(artifact_uri)
            root = os.environ[ARTIFACTS_DESTINATION_ENV_VAR]
            return get_artifact_repository(posixpath.join(root, folder))
        # The server's own check of a stored location's host (MLflow 3.x); older servers
        # open it as is, as their handlers do.
        opener = getattr(handlers, "_get_artifact_repository_for_uri", None)
        if opener is None:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            opener = get_artifact_repository
        return opener(artifact_uri)
