"""The schedules a scheduler process holds, as it holds them: each periodic task's period and next due time, and the
scheduler's last tick. Celery beat's entries (an interval, a crontab, a solar event) and taskiq's `schedule` labels
(cron, interval, time), read where the scheduler keeps them, so that nothing is declared twice.

A task with several entries is due as often as its most frequent one: its period is the shortest of theirs, and its
next due time the earliest. Its overdue alert then fires when that one stops.
"""

from __future__ import annotations

import copy
import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from traced_tasks import _conventions as names
from traced_tasks import _sampled

logger = logging.getLogger("traced_tasks")

# A scheduler's schedules are read again at its tick, at most this often: a database scheduler queries at each read.
READ_EVERY_SECONDS = 1.0
# Due times are looked for this far ahead, at most.
_HORIZON = datetime.timedelta(days=366)


@dataclass(frozen=True)
class Due:
    """One schedule entry of a task: its task label, period in seconds and next due Unix time, where known."""

    task: str
    period: float | None
    next_at: float | None


def combined(entries: Iterable[Due]) -> list[Due]:
    """One Due per task: the shortest period and the earliest next due time of its entries."""
    found: dict[str, Due] = {}
    for entry in entries:
        known = found.get(entry.task)
        if known is None:
            found[entry.task] = entry
            continue
        periods = [period for period in (known.period, entry.period) if period is not None]
        nexts = [when for when in (known.next_at, entry.next_at) if when is not None]
        found[entry.task] = Due(entry.task, min(periods, default=None), min(nexts, default=None))
    return sorted(found.values(), key=lambda due: due.task)


class Schedule(Protocol):
    engine: str

    def entries(self) -> list[Due]:
        """Every entry of the schedule now, read in the scheduler's own thread."""


class Watcher:
    """The samples of one scheduler: read at its ticks, served when collected. A worker knows the schedule its
    application declares too, for its console, but serves none of it: the scheduler's are the series."""

    def __init__(self, schedule: Schedule, served: bool = True) -> None:
        self.schedule = schedule
        self.served = served
        self._lock = threading.Lock()
        self._dues: list[Due] = []
        self._heartbeat: float | None = None
        self._read = 0.0
        self._failed = False

    def __repr__(self) -> str:
        return f"<schedules of {self.schedule.engine}>"

    def ticked(self) -> None:
        """The scheduler ticked: note it, and read its schedule again if it was not read within the last second."""
        with self._lock:
            self._heartbeat = time.time()
        self.read()

    def dues(self) -> list[Due]:
        if not self.served:  # no scheduler ticks here: read when asked
            self.read()
        with self._lock:
            return list(self._dues)

    def read(self) -> None:
        """Read the schedule again, if it was not read within the last second."""
        now = time.time()
        with self._lock:
            if now - self._read < READ_EVERY_SECONDS:
                return
            self._read = now
        try:
            dues = combined(self.schedule.entries())
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("traced_tasks: cannot read the schedule of %s (logged once)", self.schedule.engine)
            return
        with self._lock:
            self._dues = dues

    def begin_read(self) -> None:
        """Nothing to read at a collection: the scheduler's ticks keep the dues."""

    def samples(self) -> list[_sampled.Sample]:
        with self._lock:
            dues, heartbeat = list(self._dues), self._heartbeat
        found = []
        for due in dues:
            if due.period is not None:
                found.append(_sampled.Sample(names.SCHEDULE_PERIOD, (due.task,), due.period))
            if due.next_at is not None:
                found.append(_sampled.Sample(names.SCHEDULE_NEXT, (due.task,), due.next_at))
        if heartbeat is not None:
            found.append(_sampled.Sample(names.SCHEDULER_HEARTBEAT, (self.schedule.engine,), heartbeat))
        return found


class BeatSchedule:
    """Celery beat's entries, from its scheduler's `schedule`: the default scheduler's, and any scheduler that keeps
    its entries the same way (django-celery-beat's DatabaseScheduler)."""

    engine = "celery"

    def __init__(self, scheduler: Any, label: Callable[[str], str | None]) -> None:
        self._scheduler = scheduler
        self._label = label  # a Celery task name's task label, None when beat does not know the task

    def entries(self) -> list[Due]:
        found = []
        for entry in list(dict(self._scheduler.schedule).values()):
            label = self._label(entry.task)
            if label is None:
                continue
            try:
                found.append(Due(label, *beat_times(entry.schedule, entry.last_run_at)))
            except Exception:  # a schedule that cannot say when (a custom one with is_due() only)
                found.append(Due(label, None, None))
        return found


class BeatConfig:
    """The beat_schedule a Celery application declares, as a worker knows it: for its console, not served."""

    engine = "celery"

    def __init__(self, app: Any, label: Callable[[str], str | None]) -> None:
        self._app = app
        self._label = label

    def entries(self) -> list[Due]:
        from celery.schedules import maybe_schedule

        found = []
        for entry in (self._app.conf.beat_schedule or {}).values():
            label = self._label(entry.get("task", "")) if isinstance(entry, dict) else None
            if label is None:
                continue
            try:
                found.append(Due(label, *beat_times(maybe_schedule(entry["schedule"], app=self._app), None)))
            except Exception:
                found.append(Due(label, None, None))
        return found


def beat_times(schedule: Any, last_run_at: datetime.datetime | None) -> tuple[float | None, float | None]:
    """(period, next due) of a Celery schedule last run at `last_run_at`: the interval of an interval, the gap between
    the next two due times of a crontab or a solar event."""
    from celery.utils.time import maybe_make_aware

    now = schedule.now()
    last = maybe_make_aware(last_run_at or now).astimezone(schedule.tz)
    next_due = now + max(_at(schedule, now).remaining_estimate(last), datetime.timedelta(0))
    run_every = getattr(schedule, "run_every", None)
    if isinstance(run_every, datetime.timedelta):
        return run_every.total_seconds(), next_due.timestamp()
    # From the next due time on, as if it were now. A second past it, so that a solar event rounded down is not
    # found again.
    base = next_due + datetime.timedelta(seconds=1)
    gap = _at(schedule, base).remaining_estimate(base) + datetime.timedelta(seconds=1)
    return (gap.total_seconds() if gap > datetime.timedelta(0) else None), next_due.timestamp()


def _at(schedule: Any, now: datetime.datetime) -> Any:
    """The schedule as it would compute at `now`: a schedule reads its own clock, at each step of a computation."""
    fixed = copy.copy(schedule)
    fixed.app = schedule.app  # which a copy of a schedule does not keep
    fixed.nowfun = lambda: now
    return fixed


class LabelSchedule:
    """taskiq's `schedule` labels, as its LabelScheduleSource reads them: cron (with cron_offset), interval, time."""

    engine = "taskiq"

    def __init__(self, broker: Any, label: Callable[[Any], str | None]) -> None:
        self._broker = broker
        self._label = label
        self._sent: dict[str, float] = {}  # the last send of each task name, as this scheduler saw it

    def sent(self, task_name: str) -> None:
        self._sent[task_name] = time.time()

    def entries(self) -> list[Due]:
        found = []
        now = datetime.datetime.now(datetime.timezone.utc)
        for name, task in sorted(self._broker.get_all_tasks().items()):
            schedules = task.labels.get("schedule") or []
            label = self._label(task) if schedules else None
            if label is None or not isinstance(schedules, list):
                continue
            for entry in schedules:
                if isinstance(entry, dict):
                    found.append(Due(label, *self._times(name, entry, now)))
        return found

    def _times(self, name: str, entry: dict[str, Any], now: datetime.datetime) -> tuple[float | None, float | None]:
        if entry.get("cron"):
            dues = cron_dues(str(entry["cron"]), entry.get("cron_offset"), now, 2)
            if len(dues) < 2:
                return None, dues[0].timestamp() if dues else None
            return (dues[1] - dues[0]).total_seconds(), dues[0].timestamp()
        interval = entry.get("interval")
        if interval:
            seconds = interval.total_seconds() if isinstance(interval, datetime.timedelta) else float(interval)
            last = self._sent.get(name)
            return seconds, (now.timestamp() if last is None else last + seconds)
        when = entry.get("time")
        if isinstance(when, datetime.datetime):
            aware = when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)
            return None, aware.timestamp() if aware > now else None
        return None, None


def cron_dues(cron: str, offset: object, now: datetime.datetime, count: int) -> list[datetime.datetime]:
    """The next `count` times after `now` (aware, UTC) at which taskiq's scheduler sends a cron schedule, as it
    decides: pycron's `is_now` on the time of the offset (a timedelta added to UTC, or a time zone's name). Days,
    then hours, then minutes, so that a yearly schedule costs hundreds of checks, not half a million."""
    import pycron  # type: ignore[import-untyped]

    local = _localizer(offset)
    fields = cron.split()
    if len(fields) != 5:
        return []
    _, hour, dom, month, dow = fields
    found: list[datetime.datetime] = []
    start = now.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    start_local = local(start).replace(tzinfo=None)
    day = start_local.replace(hour=0, minute=0)
    while len(found) < count and day - start_local < _HORIZON:
        if pycron.is_now(f"* * {dom} {month} {dow}", day):
            for hours in range(24):
                at_hour = day.replace(hour=hours)
                if not pycron.is_now(f"* {hour} {dom} {month} {dow}", at_hour):
                    continue
                for minutes in range(60):
                    at = at_hour.replace(minute=minutes)
                    if at < start_local:
                        continue
                    if pycron.is_now(cron, at):
                        found.append(_utc(at, offset))
                        if len(found) == count:
                            return found
        day += datetime.timedelta(days=1)
    return found


def _localizer(offset: object) -> Callable[[datetime.datetime], datetime.datetime]:
    if isinstance(offset, datetime.timedelta):
        return lambda when: when + offset
    if isinstance(offset, str) and offset:
        from zoneinfo import ZoneInfo

        zone = ZoneInfo(offset)
        return lambda when: when.astimezone(zone)
    return lambda when: when


def _utc(local: datetime.datetime, offset: object) -> datetime.datetime:
    """A wall time of the offset's clock, back in UTC."""
    if isinstance(offset, datetime.timedelta):
        return (local - offset).replace(tzinfo=datetime.timezone.utc)
    if isinstance(offset, str) and offset:
        from zoneinfo import ZoneInfo

        return local.replace(tzinfo=ZoneInfo(offset)).astimezone(datetime.timezone.utc)
    return local.replace(tzinfo=datetime.timezone.utc)


_watchers: list[Watcher] = []


def watch(schedule: Schedule, served: bool = True) -> Watcher:
    """Sample `schedule` from now on, in every metrics backend where `served` (this process is its scheduler); else
    only for the console."""
    watcher = Watcher(schedule, served)
    _watchers.append(watcher)
    if served:
        _sampled.add(watcher)
    return watcher


def watching() -> list[Watcher]:
    return list(_watchers)
