"""Series sampled from outside the runs: the queues of a broker, the schedules of a scheduler. Their sources add
themselves here, and every metrics backend serves what they sample, when it is collected: /metrics, the console, an
OpenTelemetry reader."""

from __future__ import annotations

import logging
import threading
import time
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
    def begin_read(self) -> threading.Thread | None:
        """Begin reading what it samples, when a read is due, in a thread of its own: the thread, or None."""

    def samples(self) -> Iterable[Sample]:
        """What it knows now, from its last read: quick, never on the network."""


# How long a collection waits for the reads it began, all together, before it serves the last ones.
WAIT_SECONDS = 2.0


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
    reading = []
    for source in sources:
        try:
            thread = source.begin_read()
        except Exception:
            _failed_once(source)
        else:
            if thread is not None:
                reading.append(thread)
    # Together: however many brokers are down, a collection waits WAIT_SECONDS at most.
    deadline = time.monotonic() + WAIT_SECONDS
    for thread in reading:
        thread.join(max(deadline - time.monotonic(), 0.0))
    found: dict[tuple[str, tuple[str, ...]], Sample] = {}
    for source in sources:
        try:
            for sample in source.samples():
                found.setdefault((sample.family.name, sample.labels), sample)
        except Exception:
            _failed_once(source)
    return list(found.values())


def _failed_once(source: Source) -> None:
    if id(source) not in _failed:
        _failed.add(id(source))
        logger.exception("traced_tasks: cannot sample %r; its series are left out", source)
