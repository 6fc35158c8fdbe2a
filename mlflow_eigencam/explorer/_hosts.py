"""Which ``Host`` headers ``mlflow-eigencam ui`` answers (DNS rebinding).

A page the user visits can point a name of its own at 127.0.0.1 and then read the explorer
as if it were that site; its requests carry that name in ``Host``. The explorer answers only
the names it listens on (and those given with ``--allowed-hosts``); anything else gets 403,
as MLflow's own server does.
"""

from __future__ import annotations

import fnmatch
import json
import socket
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

__all__ = ["HostCheck", "allowed_hosts", "parse_allowed_hosts"]

_LOCAL = ("127.0.0.1", "localhost", "[::1]")
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def parse_allowed_hosts(text: Optional[str]) -> List[str]:
    """``--allowed-hosts`` as a list: comma-separated ``NAME`` / ``NAME:PORT`` / patterns
    with ``*``; ``*`` alone allows any host. Empty entries are dropped.

    Raises:
        ValueError: An entry with a space or a slash (a URL was given, not a host).
    """
    out = []
    for raw in (text or "").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if any(c in entry for c in " /\t"):
            raise ValueError(f"--allowed-hosts entry {raw.strip()!r} is not a host name "
                             f"(expected NAME or NAME:PORT, e.g. explorer.example.org:5050)")
        out.append(entry)
    return out


def allowed_hosts(bind: str, port: int, extra: Sequence[str] = ()) -> List[str]:
    """The ``Host`` values the explorer answers when listening on ``bind:port``: the loopback
    names, the bound address (and, bound to every address, this machine's name), each with
    the port, then ``extra`` (see :func:`parse_allowed_hosts`)."""
    names = list(_LOCAL)
    if bind in _ANY_ADDRESS:
        names += ["0.0.0.0", socket.gethostname().lower()]
    else:
        names.append(_bracketed(bind.lower()))
    # Port 80 is left out of Host by browsers: the bare names then.
    with_port = [f"{n}:{port}" for n in names] + (names if port == 80 else [])
    return list(dict.fromkeys(with_port + list(extra)))


class HostCheck:
    """WSGI middleware: 403 for a request whose ``Host`` is not allowed.

    Args:
        app: The WSGI application behind it.
        allowed: From :func:`allowed_hosts`. An entry ``NAME:PORT`` matches that exactly,
            ``NAME`` that name on any port, one with ``*`` as a pattern; ``*`` matches all.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]], allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = list(allowed)

    def allows(self, host: str) -> bool:
        """Whether a ``Host`` header value is one of the allowed."""
        host = host.strip().lower().rstrip(".")
        if not host:
            return False
        name = _name_of(host)
        for entry in self.allowed:
            if entry == "*" or entry == host:
                return True
            if "*" in entry:
                # "[" opens a character class in fnmatch: match IPv6 literals as text.
                if fnmatch.fnmatchcase(host, entry.replace("[", "[[]")) or \
                        fnmatch.fnmatchcase(name, entry.replace("[", "[[]")):
                    return True
            elif _name_of(entry) == entry and entry == name:  # NAME: any port
                return True
        return False

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST", "")
        if self.allows(host):
            return self.app(environ, start_response)
        body = json.dumps({"error": f"Invalid Host header {host!r}: this explorer answers "
                                    f"{', '.join(self.allowed)}; start it with --allowed-hosts "
                                    f"to allow another name"}).encode("utf-8")
        start_response("403 Forbidden", [("Content-Type", "application/json; charset=utf-8"),
                                         ("Content-Length", str(len(body))),
                                         ("X-Content-Type-Options", "nosniff"),
                                         ("Cache-Control", "no-store")])
        return [body]


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _name_of(host: str) -> str:
    """``host`` without its port (``[::1]:5050`` -> ``[::1]``, ``a:80`` -> ``a``)."""
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host
