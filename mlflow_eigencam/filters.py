"""Which (mode, ds_id) pairs the logger records: ``None``, ``"eval"``, ``{"eval", "test"}``, ``"!train"``.

A filter spec is one of:

* ``None``: everything passes.
* a string: ``"eval"`` passes only ``"eval"``; ``"!train"`` passes everything except ``"train"``.
* an iterable of strings: an allow-list (``["eval", "test"]``) or a deny-list
  (``["!train", "!infer"]``). Mixing negated and plain names in one spec raises ``ValueError``:
  ``["eval", "!train"]`` has no meaning that the allow-list alone would not give.

A value of ``None`` (a batch with no dataset id) passes the filter ``None`` and every
deny-list (``None`` is never a denied name), and never passes an allow-list.

``repr(filter)`` is the compact form written into run tags: ``"*"`` for ``None``, the names
joined by commas otherwise (``"eval,test"``, ``"!train"``, ``"!ds1,!ds2"``), sorted so that a
set gives the same tag in every process. Splitting it on commas gives the spec back
(except ``"*"``), so names containing a comma make the tag ambiguous.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Optional, Union

__all__ = ["MODES", "Filter", "FilterSpec", "mode_filter", "ds_id_filter"]

MODES = ("train", "eval", "test", "infer")

FilterSpec = Union[None, str, Iterable[str], "Filter"]


class Filter:
    """A predicate over mode or dataset-id names built from a filter spec.

    Args:
        spec: ``None``, a name, ``"!name"``, an iterable of names, or another ``Filter``
            (copied).
        kind: What is filtered (``"mode"``, ``"ds_id"``), used in error messages.
        allowed: When given, every name in ``spec`` and every value passed to the filter
            must be one of these (``ValueError`` listing them otherwise).

    Raises:
        TypeError: A name that is not a string, or a spec that is neither ``None``, a
            string nor an iterable.
        ValueError: An empty name, an empty negation ``"!"``, an empty iterable, negated
            and plain names mixed, or a name outside ``allowed``.
    """

    __slots__ = ("kind", "allowed", "negated", "names")

    def __init__(self, spec: FilterSpec, *, kind: str, allowed: Optional[Collection[str]] = None) -> None:
        self.kind = kind
        self.allowed: Optional[tuple[str, ...]] = tuple(allowed) if allowed is not None else None
        #: True for a deny-list; False for an allow-list or for ``None``.
        self.negated: bool = False
        #: The names in the spec without their ``!``; ``None`` when every value passes.
        self.names: Optional[frozenset[str]] = None

        if isinstance(spec, Filter):
            self.negated, self.names = spec.negated, spec.names
            if self.names is not None:
                for name in self.names:
                    self._check_allowed(name)
            return
        if spec is None:
            return
        if isinstance(spec, str):
            items: list[object] = [spec]
        elif isinstance(spec, (bytes, bytearray)) or not isinstance(spec, Iterable):
            raise TypeError(
                f"{kind} filter must be None, a string or an iterable of strings, got {spec!r} "
                f"({type(spec).__name__})"
            )
        else:
            items = list(spec)
            if not items:
                # An empty allow-list would silently log nothing; that is never what was meant.
                raise ValueError(f"{kind} filter got an empty iterable; pass None to accept every {kind}")

        plain: set[str] = set()
        denied: set[str] = set()
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"{kind} filter names must be strings, got {item!r} ({type(item).__name__})")
            negated = item.startswith("!")
            name = item[1:] if negated else item
            if not name or name.startswith("!"):
                raise ValueError(
                    f"{kind} filter got {item!r}; expected a name or '!name' (e.g. '!train'), "
                    "not an empty name or a double negation"
                )
            self._check_allowed(name)
            (denied if negated else plain).add(name)
        if plain and denied:
            raise ValueError(
                f"{kind} filter {items!r} mixes negated and plain names; use either an allow-list "
                f"like {sorted(plain)!r} or a deny-list like {['!' + n for n in sorted(denied)]!r}"
            )
        self.negated = bool(denied)
        self.names = frozenset(denied or plain)

    def _check_allowed(self, name: str) -> None:
        if self.allowed is not None and name not in self.allowed:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {', '.join(self.allowed)}")

    def __call__(self, value: Optional[str]) -> bool:
        """Whether ``value`` passes.

        Args:
            value: A name, or ``None`` (passes ``None`` filters and deny-lists only).

        Raises:
            TypeError: ``value`` is neither a string nor ``None``.
            ValueError: ``allowed`` was given and ``value`` is not in it (a typo such as
                ``"val"`` for ``"eval"`` would otherwise never be logged, silently).
        """
        if value is not None:
            if not isinstance(value, str):
                raise TypeError(f"{self.kind} must be a string or None, got {value!r} ({type(value).__name__})")
            self._check_allowed(value)
        if self.names is None:
            return True
        if value is None:
            return self.negated
        return (value in self.names) != self.negated

    def __repr__(self) -> str:
        if self.names is None:
            return "*"
        prefix = "!" if self.negated else ""
        return ",".join(prefix + name for name in sorted(self.names))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Filter):
            return NotImplemented
        return (self.kind, self.negated, self.names) == (other.kind, other.negated, other.names)

    def __hash__(self) -> int:
        return hash((self.kind, self.negated, self.names))


def mode_filter(spec: FilterSpec) -> Filter:
    """A filter over the modes in ``MODES``; unknown names raise ``ValueError`` listing them."""
    return Filter(spec, kind="mode", allowed=MODES)


def ds_id_filter(spec: FilterSpec) -> Filter:
    """A filter over dataset ids (any string; a ``None`` id passes only ``None`` and deny-lists)."""
    return Filter(spec, kind="ds_id")
