"""``mlflow-eigencam``: send a leftover spool, compare epochs across runs."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _send_spool(args: argparse.Namespace) -> int:
    from ._recovery import send_spool

    sent, left = send_spool(args.path, tracking_uri=args.tracking_uri, timeout=args.timeout,
                            retarget=args.retarget, report=print)
    where = args.path or "the spool root"
    print(f"sent {sent} item(s); {left} not delivered (still in {where}, or set aside in its "
          f"failed/ folders)")
    return 0 if left == 0 else 1


def _ui(args: argparse.Namespace) -> int:
    from .explorer import serve
    from .explorer._hosts import parse_allowed_hosts

    serve(args.tracking_uri, args.host, args.port, mlflow_ui=args.mlflow_ui,
          hosts=parse_allowed_hosts(args.allowed_hosts), server=args.server)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands: send-spool, ui, compare)."""
    parser = argparse.ArgumentParser(prog="mlflow-eigencam",
                                     description="EigenCAM overlays in MLflow: tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("send-spool", help="send what could not be sent to MLflow during training")
    p.add_argument("path", nargs="?", default=None,
                   help="spool folder named in the warning; default: every spool left under "
                        "$MLFLOW_EIGENCAM_SPOOL_DIR or ~/.cache/mlflow_eigencam/spool")
    p.add_argument("--tracking-uri", default=None,
                   help="where to send (default $MLFLOW_TRACKING_URI); a spool recorded for "
                        "another URI is refused unless --retarget")
    p.add_argument("--retarget", action="store_true",
                   help="send spools recorded for another tracking URI to --tracking-uri")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.set_defaults(func=_send_spool)
    p = sub.add_parser("ui", help="serve the EigenCAM explorer (read-only) for a tracking server",
                       description="Serve the EigenCAM explorer: the same samples across runs, "
                                   "epochs and experiments, in a live page. Read-only.")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI / MLflow's default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5050, help="port (default: 5050)")
    p.add_argument("--mlflow-ui", default=None, metavar="URL",
                   help="MLflow UI address for run links (default: the tracking URI if http(s))")
    p.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                   help="also answer requests for these Host names (comma-separated NAME or "
                        "NAME:PORT, * in patterns; '*': any). Default: only 127.0.0.1, "
                        "localhost, [::1] and --host, with --port; others get 403 (DNS "
                        "rebinding)")
    p.add_argument("--server", choices=("gunicorn", "waitress", "stdlib"), default=None,
                   help="the WSGI server (default: gunicorn, one process with 16 threads, where "
                        "installed, as MLflow installs it off Windows; else waitress; else the "
                        "standard library's threaded server)")
    p.set_defaults(func=_ui)
    from .compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``mlflow-eigencam`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, LookupError, ConnectionError) as exc:
        print(f"mlflow-eigencam: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
