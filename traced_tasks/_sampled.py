"""Series sampled from outside the runs: the queues of a broker, the schedules of a scheduler. Their sources add
themselves here, and every metrics backend serves what they sample, when it is collected: /metrics, the console, an
OpenTelemetry reader."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from traced_tasks import _conventions as names

logger = logging.getLogger("traced_tasks")


@dataclass(frozen=True)
class Sample:
    """One value of a sampled family, under that family's own labels."""

    family: names.Family
    labels: tuple[str, ...]
    value: float


class Source(Protocol):
    def samples(self) -> Iterable[Sample]:
        """What it knows now; quick, and never blocking on the network for longer than its own timeout."""


_sources: list[Source] = []
_lock = threading.Lock()
_failed: set[int] = set()  # the sources whose failure was logged, each once


def add(source: Source) -> None:
    with _lock:
        if source not in _sources:
            _sources.append(source)


def remove(source: Source) -> None:
    with _lock:
        if source in _sources:
            _sources.remove(source)


def collect() -> list[Sample]:
    """Every source's samples, one per family and labels (the first source's wins); a source that fails is left out,
    and logged once."""
    with _lock:
        sources = list(_sources)
    found: dict[tuple[str, tuple[str, ...]], Sample] = {}
    for source in sources:
        try:
            for sample in source.samples():
                found.setdefault((sample.family.name, sample.labels), sample)
        except Exception:
            if id(source) not in _failed:
                _failed.add(id(source))
                logger.exception("traced_tasks: cannot sample %r; its series are left out", source)
    return list(found.values())
