"""Progress events of a run, for whoever shows them (the command line's live view). Runners and flows in this
process ``emit`` them; a viewer ``subscribe``s. Emitting never raises: a broken viewer never stops a run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("deepercluster")


@dataclass(frozen=True)
class Event:
    """``kind``: ``stage`` (a stage starts: ``label``, ``status`` running | done | recomputed), ``units`` (a step's
    units: ``label``, ``step``, ``done``, ``total``), ``stage_end`` (``label``, ``seconds``, ``units``), ``metrics``
    (a round's history row: ``row``)."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


_subscribers: list[Callable[[Event], None]] = []


def subscribe(fn: Callable[[Event], None]) -> Callable[[], None]:
    """Call ``fn`` with every event from now on; returns the function that stops it."""
    _subscribers.append(fn)
    return lambda: _subscribers.remove(fn) if fn in _subscribers else None


def emit(kind: str, **data: Any) -> None:
    event = Event(kind, data)
    for fn in list(_subscribers):
        try:
            fn(event)
        except Exception as err:  # a viewer's bug must not stop the run
            log.warning("progress viewer failed (%s); the run goes on", err)
