"""What the explorer's tests do with it: open a page in Chromium and wait until it is drawn,
read which samples it shows, and call its WSGI app directly (no server)."""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

#: How long a browser test waits for the page, in milliseconds.
TIMEOUT_MS = 30_000


def open_page(page: Any, url: str) -> None:
    """Navigate and wait until the explorer says it has drawn (``body[data-ready='1']``)."""
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")


def shown(page: Any) -> List[str]:
    """The sample ids of the grid's rows, top to bottom."""
    return page.eval_on_selector_all("#grid tbody tr.sample", "rs => rs.map(r => r.dataset.sid)")


def wsgi_get(app: Callable, path: str, query: str = "", **environ: Any) -> Tuple[int, bytes]:
    """``(status code, body)`` of a GET through the explorer's WSGI app."""
    seen: List[str] = []
    body = b"".join(app(dict({"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET",
                              "SCRIPT_NAME": ""}, **environ),
                        lambda status, headers: seen.append(status)))
    return int(seen[0].split()[0]), body
