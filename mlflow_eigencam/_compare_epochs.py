"""EPOCHS specs of ``compare`` (``RUN_ID@EPOCHS``, ``--epochs``): parsed, checked, resolved.

Comma-separated items, each an epoch (``4``; it must have been logged), a range (``0-9``; the
logged epochs in it, at least one), ``first``, ``last`` or ``all``.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple

__all__ = ["check_epoch_spec", "epoch_list", "evenly", "parse_epochs", "split_at"]

_ITEM = re.compile(r"^(?:(?P<a>\d+)(?:-(?P<b>\d+))?|(?P<word>first|last|all))$")


def check_epoch_spec(spec: str) -> List[Tuple[str, int, int]]:
    """Syntax check of an EPOCHS spec -> items ("epoch"|"range"|"first"|"last"|"all", a, b)."""
    if not isinstance(spec, str):
        raise TypeError(f"EPOCHS must be a string such as '0,4,9', '0-9', 'last' or 'all', got {spec!r}")
    items = []
    for raw in spec.split(","):
        item = raw.strip().lower()
        m = _ITEM.match(item)
        if m is None:
            raise ValueError(f"bad EPOCHS spec {spec!r}: item {raw.strip()!r} is not an epoch (4), "
                             "a range (0-9), 'first', 'last' or 'all'")
        if m.group("word"):
            items.append((m.group("word"), 0, 0))
        elif m.group("b") is not None:
            a, b = int(m.group("a")), int(m.group("b"))
            if b < a:
                raise ValueError(f"bad EPOCHS spec {spec!r}: range {item!r} runs backwards")
            items.append(("range", a, b))
        else:
            items.append(("epoch", int(m.group("a")), 0))
    return items


def parse_epochs(spec: Optional[str], logged: Iterable[int], *, what: str = "the run") -> List[int]:
    """Resolve an EPOCHS spec against the epochs a run logged.

    Args:
        spec: ``"0,4,9"``, ``"0-9"``, ``"first"``, ``"last"``, ``"all"``, a mix joined by
            commas, or None (all).
        logged: Epochs the run logged.
        what: How to name the run in error messages.

    Returns:
        Selected epochs, ascending, without repeats.

    Raises:
        ValueError: The spec is not of that form.
        LookupError: An epoch (or a whole range) that was not logged; the message lists the
            logged epochs.
    """
    logged_sorted = sorted({int(e) for e in logged})
    items = check_epoch_spec("all" if spec is None else spec)
    if not logged_sorted:
        raise LookupError(f"{what} logged no epochs")
    chosen = set()
    for kind, a, b in items:
        if kind == "all":
            chosen.update(logged_sorted)
        elif kind == "first":
            chosen.add(logged_sorted[0])
        elif kind == "last":
            chosen.add(logged_sorted[-1])
        elif kind == "epoch":
            if a not in logged_sorted:
                raise LookupError(f"epoch {a} was not logged by {what}; logged epochs: "
                                  f"{epoch_list(logged_sorted)}")
            chosen.add(a)
        else:
            inside = [e for e in logged_sorted if a <= e <= b]
            if not inside:
                raise LookupError(f"no epoch in {a}-{b} was logged by {what}; logged epochs: "
                                  f"{epoch_list(logged_sorted)}")
            chosen.update(inside)
    return sorted(chosen)


def epoch_list(epochs: Sequence[int], limit: int = 30) -> str:
    if len(epochs) <= limit:
        return ", ".join(str(e) for e in epochs)
    head = ", ".join(str(e) for e in epochs[: limit - 3])
    return f"{head}, ... {', '.join(str(e) for e in epochs[-3:])} ({len(epochs)} epochs)"


def evenly(epochs: Sequence[int], n: int) -> List[int]:
    """``n`` of ``epochs``, evenly spaced, first and last included."""
    if len(epochs) <= n:
        return list(epochs)
    if n == 1:
        return [epochs[-1]]
    idx = sorted({round(i * (len(epochs) - 1) / (n - 1)) for i in range(n)})
    return [epochs[i] for i in idx]


def split_at(text: str) -> Tuple[str, Optional[str]]:
    """``"ID@EPOCHS"`` -> ("ID", "EPOCHS"); no ``@`` -> ("ID", None)."""
    if "@" in text:
        head, spec = text.rsplit("@", 1)
        return head, spec
    return text, None
