"""The work that waits: how many messages a broker's queue holds, when the oldest of them was scheduled, and how many
consumers it has, read without taking, reordering or redelivering anything.

A `Watcher` samples one engine application's queues for every metrics backend (`_sampled`): when /metrics, the
console or an OpenTelemetry reader collects, at most every `queue_every` seconds, in a thread of its own, waited
for, with every other source's reads, _sampled.WAIT_SECONDS at most. A broker that is down or slow never holds a
scrape up and never raises: the queue's sample goes stale, which the time of its last read (QUEUE_SAMPLED) tells.

The readers use what the broker already answers: Redis lists (`LLEN`, `LINDEX -1`, pipelined), a Redis stream's
consumer group (`XINFO GROUPS`, then `XRANGE` after its last delivered entry), and AMQP's passive `queue_declare`,
through kombu. kombu's other transports make a queue a passive declare names: they are not read. The time a
message was scheduled is the one traced_tasks put in it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from traced_tasks import _config, _sampled, _wire
from traced_tasks import _conventions as names
from traced_tasks._options import QUEUE_EVERY, QUEUE_EVERY_SECONDS

logger = logging.getLogger("traced_tasks")

# The socket timeout of the readers' clients: as long as a collection waits for them.
READ_TIMEOUT_SECONDS = _sampled.WAIT_SECONDS
# Queues read one by one, in name order; the rest are summed in one row, `__overflow__`.
MAX_QUEUES = 100

# Which queues to read: None, those the application names; a collection, those; a function, of those found.
Queues = Collection[str] | Callable[[frozenset[str]], Iterable[str]] | None


def check(queues: object) -> None:
    """Raise TypeError, at the call, for a `queues` argument that is not one."""
    if queues is None or callable(queues):
        return
    if isinstance(queues, (str, bytes)) or not isinstance(queues, Collection):
        raise TypeError(
            f"queues must be a collection of queue names, a function of the found ones, or None; got {queues!r}"
        )
    wrong = [queue for queue in queues if not isinstance(queue, str) or not queue]
    if wrong:
        raise TypeError(f"queues must be names (non-empty str), got {wrong[0]!r}")


def chosen(found: Iterable[str], queues: Queues) -> list[str]:
    """The queue names to read: those found, edited or replaced by `queues`."""
    names_found = frozenset(found)
    if queues is None:
        picked: Iterable[str] = names_found
    elif callable(queues):
        picked = queues(names_found)
    else:
        picked = queues
    return sorted({queue for queue in picked if isinstance(queue, str) and queue})


@dataclass(frozen=True)
class Queue:
    """One queue, as read: None where the broker cannot tell."""

    name: str
    depth: float | None
    oldest: float | None  # the Unix time its oldest waiting message was scheduled
    consumers: float | None


class Reader(Protocol):
    """The queues of one engine application, and how to read them."""

    engine: str

    def queues(self) -> list[str]:
        """The names to read now."""

    def read(self, queues: list[str]) -> list[Queue]:
        """Read them, in one round trip to the broker where it allows; raise when it cannot."""

    def close(self) -> None:
        """Drop the connection, to be made again at the next read."""


class Watcher:
    """The samples of one Reader's queues, read again when they are older than `queue_every`."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self._lock = threading.Lock()
        self._queues: list[Queue] = []
        self._sampled_at: float | None = None  # the last successful read
        self._tried = 0.0  # time.monotonic() of the last read begun
        self._reading: threading.Thread | None = None
        self._failed = False

    def __repr__(self) -> str:
        return f"<queues of {self.reader.engine}>"

    def samples(self) -> list[_sampled.Sample]:
        if not getattr(self.reader, "alive", True):
            return []
        with self._lock:
            queues, sampled_at = list(self._queues), self._sampled_at
        engine = self.reader.engine
        found = []
        for queue in queues:
            labels = (engine, queue.name)
            for family, value in (
                (names.QUEUE_DEPTH, queue.depth),
                (names.QUEUE_OLDEST, queue.oldest),
                (names.QUEUE_CONSUMERS, queue.consumers),
                (names.QUEUE_SAMPLED, sampled_at),
            ):
                if value is not None:
                    found.append(_sampled.Sample(family, labels, value))
        return found

    def begin_read(self) -> threading.Thread | None:
        """Begin reading the queues when the last read is older than queue_every, in a thread of its own, which
        the collection waits for (with every other source's, _sampled.WAIT_SECONDS at most); a collection while a
        read is under way takes the last samples."""
        if not getattr(self.reader, "alive", True):
            unwatch(self)
            return None
        with self._lock:
            if self._reading is not None or time.monotonic() - self._tried < _every():
                return None
            self._tried = time.monotonic()
            reading = self._reading = threading.Thread(target=self._read, name="traced_tasks-queues", daemon=True)
            reading.start()
            return reading

    def _read(self) -> None:
        try:
            found = self.reader.read(self.reader.queues())
        except Exception:
            if not self._failed:
                self._failed = True
                logger.warning(
                    "traced_tasks: cannot read the queues of %s; their samples go stale until it can (logged once)",
                    self.reader.engine,
                    exc_info=True,
                )
            with contextlib.suppress(Exception):  # a connection that cannot even close: made again at the next read
                self.reader.close()
            found = None
        with self._lock:
            if found is not None:
                self._queues = _capped(found)
                self._sampled_at = time.time()
                self._failed = False
            self._reading = None


def _every() -> float:
    every = _config.current().options.queue_every
    return every if every is not None else QUEUE_EVERY.value() or QUEUE_EVERY_SECONDS


def _capped(queues: list[Queue]) -> list[Queue]:
    """The first MAX_QUEUES queues by name, and one row that sums the rest."""
    ordered = sorted(queues, key=lambda queue: queue.name)
    kept, rest = ordered[:MAX_QUEUES], ordered[MAX_QUEUES:]
    if not rest:
        return kept
    oldest = [queue.oldest for queue in rest if queue.oldest is not None]
    depths = [queue.depth for queue in rest if queue.depth is not None]
    consumers = [queue.consumers for queue in rest if queue.consumers is not None]
    overflow = Queue(
        names.OVERFLOW,
        sum(depths) if depths else None,
        min(oldest) if oldest else None,
        sum(consumers) if consumers else None,
    )
    return [*kept, overflow]


# Where the time of scheduling is, in a message as a broker holds it.


def celery_scheduled_at(message: bytes | str | None) -> float | None:
    """A Celery message's time of scheduling, from its headers; its arguments (the body) are never decoded."""
    return _scheduled_at(message, "headers")


def taskiq_scheduled_at(message: bytes | str | None) -> float | None:
    """A taskiq message's time of scheduling, from its labels."""
    return _scheduled_at(message, "labels")


def _scheduled_at(message: bytes | str | None, part: str) -> float | None:
    if message is None:
        return None
    try:
        found = json.loads(message).get(part) or {}
        return _wire.scheduled_at(found.get(_wire.SCHEDULED_AT)) if isinstance(found, dict) else None
    except (ValueError, AttributeError, TypeError):
        return None


class RedisLists:
    """Queues that are Redis lists the producer LPUSHes to and the consumer BRPOPs from: Celery's (a queue and its
    priority lists) and taskiq's ListQueueBroker. Its depth is their lengths' sum, its oldest message the earliest
    scheduled of their last elements. Redis tells no consumers. `keys(made, queue)`: the lists of a queue, given the
    client `client()` made."""

    def __init__(
        self,
        engine: str,
        client: Callable[[], Any],
        queues: Callable[[], list[str]],
        keys: Callable[[Any, str], list[str]],
        scheduled_at: Callable[[Any], float | None],
    ) -> None:
        self.engine = engine
        self._client = client
        self._queues = queues
        self._keys = keys
        self._scheduled_at = scheduled_at
        self._made: Any = None

    def queues(self) -> list[str]:
        return self._queues()

    def read(self, queues: list[str]) -> list[Queue]:
        if self._made is None:
            self._made = self._client()
        pipeline = self._made.pipeline(transaction=False)
        keys = {queue: self._keys(self._made, queue) for queue in queues}
        for queue in queues:
            for key in keys[queue]:
                pipeline.llen(key)
                pipeline.lindex(key, -1)
        answers = iter(pipeline.execute())
        found = []
        for queue in queues:
            depth = 0
            oldest = []
            for _ in keys[queue]:
                length, last = next(answers), next(answers)
                depth += int(length or 0)
                when = self._scheduled_at(last)
                if when is not None:
                    oldest.append(when)
            found.append(Queue(queue, float(depth), min(oldest) if oldest else None, None))
        return found

    def close(self) -> None:
        made, self._made = self._made, None
        if made is not None:
            made.close()


class RedisStream:
    """A Redis stream read by a consumer group, taskiq's RedisStreamBroker: its depth is what the group has not been
    delivered yet (`lag`); what was delivered and not acknowledged runs now, and does not wait. Its oldest waiting
    entry is the first after the group's last delivered one; its consumers, those that read within the last minute."""

    def __init__(self, engine: str, client: Callable[[], Any], streams: Callable[[], list[str]], group: str) -> None:
        self.engine = engine
        self._client = client
        self._streams = streams
        self._group = group
        self._made: Any = None

    def queues(self) -> list[str]:
        return self._streams()

    def read(self, queues: list[str]) -> list[Queue]:
        if self._made is None:
            self._made = self._client()
        client = self._made
        found = []
        for stream in queues:
            pipeline = client.pipeline(transaction=False)
            pipeline.exists(stream)
            pipeline.xinfo_groups(stream)
            exists, groups = _stream_answers(pipeline)
            group = next((group for group in groups if _text(group.get("name")) == self._group), None)
            if not exists:
                found.append(Queue(stream, 0.0, None, 0.0))
                continue
            depth: float | None
            pipeline = client.pipeline(transaction=False)
            if group is None:  # no consumer group yet: nothing was ever delivered
                pipeline.xrange(stream, min=b"-", max="+", count=1)
                pipeline.xlen(stream)
                first, length = pipeline.execute()
                depth, consumers = float(length), 0.0
            else:
                pipeline.xrange(stream, min=b"(" + _bytes(group.get("last-delivered-id")), max="+", count=1)
                pipeline.xinfo_consumers(stream, self._group)
                first, listed = pipeline.execute()
                lag = group.get("lag")  # Redis 7.0 or later
                depth, consumers = (None if lag is None else float(lag)), float(_live_consumers(listed))
            found.append(Queue(stream, depth, _stream_oldest(first), consumers))
        return found

    def close(self) -> None:
        made, self._made = self._made, None
        if made is not None:
            made.close()


def _stream_answers(pipeline: Any) -> tuple[bool, list[dict[str, Any]]]:
    exists, groups = pipeline.execute(raise_on_error=False)
    if isinstance(groups, Exception):  # no such key: XINFO fails on a stream that does not exist
        return bool(exists) if not isinstance(exists, Exception) else False, []
    return bool(exists), list(groups)


def _live_consumers(consumers: list[dict[str, Any]]) -> int:
    """The consumers of a group (XINFO CONSUMERS) that read within the last minute: a process that died stays
    listed. Redis 7.2 tells when each last tried (`inactive`); before it, when each last read something (`idle`)."""
    return sum(1 for consumer in consumers if int(consumer.get("inactive", consumer.get("idle", 0)) or 0) < 60_000)


def _stream_oldest(entries: list[Any]) -> float | None:
    if not entries:
        return None
    entry_id, fields = entries[0]
    data = fields.get(b"data") if isinstance(fields, dict) else None
    when = taskiq_scheduled_at(data)
    if when is not None:
        return when
    try:  # the entry's ID is the time it was added, in milliseconds
        return int(_text(entry_id).split("-")[0]) / 1000.0
    except ValueError:
        return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class KombuQueues:
    """Queues of an AMQP broker (RabbitMQ), through kombu, by a passive queue_declare: its ready messages and its
    consumers. AMQP has no way to look at a message without taking it, so the oldest is not known."""

    def __init__(
        self, engine: str, connection: Callable[[], Any], queues: Callable[[], list[str]], consumers: bool
    ) -> None:
        self.engine = engine
        self._connection = connection
        self._queues = queues
        self._consumers = consumers
        self._made: Any = None

    def queues(self) -> list[str]:
        return self._queues()

    def read(self, queues: list[str]) -> list[Queue]:
        if self._made is None:
            self._made = self._connection()
        connection = self._made
        channel = connection.default_channel
        found = []
        for queue in queues:
            try:
                _, depth, consumers = channel.queue_declare(queue=queue, passive=True)
            except connection.channel_errors:  # no such queue: an empty one
                depth, consumers = 0, 0
                channel = connection.default_channel  # py-amqp reopens it; other transports keep it
            found.append(Queue(queue, float(depth), None, float(consumers) if self._consumers else None))
        return found

    def close(self) -> None:
        made, self._made = self._made, None
        if made is not None:
            made.release()


def watch(reader: Reader) -> Watcher:
    """Sample `reader`'s queues from now on, in every metrics backend."""
    watcher = Watcher(reader)
    _sampled.add(watcher)
    return watcher


def unwatch(watcher: Watcher) -> None:
    _sampled.remove(watcher)
    watcher.reader.close()


def waiting() -> list[tuple[str, Queue, float | None]]:
    """What the watched queues held at their last read, as (engine, queue, when read), for the console."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    for sample in _sampled.collect():
        if sample.family in (names.QUEUE_DEPTH, names.QUEUE_OLDEST, names.QUEUE_CONSUMERS, names.QUEUE_SAMPLED):
            found.setdefault((sample.labels[0], sample.labels[1]), {})[sample.family.name] = sample.value
    return [
        (
            engine,
            Queue(
                queue,
                values.get(names.QUEUE_DEPTH.name),
                values.get(names.QUEUE_OLDEST.name),
                values.get(names.QUEUE_CONSUMERS.name),
            ),
            values.get(names.QUEUE_SAMPLED.name),
        )
        for (engine, queue), values in sorted(found.items())
    ]


def _read_timeouts() -> dict[str, Any]:
    seconds = READ_TIMEOUT_SECONDS
    return {
        "socket_timeout": seconds,  # Redis
        "socket_connect_timeout": seconds,
        "read_timeout": seconds,  # AMQP
        "write_timeout": seconds,
        "max_retries": 0,
    }


def celery_names(app: Any) -> set[str]:
    """The queues a Celery application names: its default queue, `task_queues`, the queues of static `task_routes`,
    and those its tasks and beat entries are given."""
    conf = app.conf
    found = {conf.task_default_queue or "celery"}
    declared = conf.task_queues or ()
    for queue in declared.values() if isinstance(declared, dict) else declared:
        exchange = getattr(queue, "exchange", None)
        if getattr(exchange, "type", None) != "fanout":  # a Broadcast queue is one per worker
            found.add(_queue_name(queue))
    routes = conf.task_routes or ()
    for table in [routes] if isinstance(routes, dict) else routes:
        items = table.items() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
        for item in items:
            route = item[1] if isinstance(item, tuple) and len(item) == 2 else None
            found.add(_queue_name(route.get("queue") if isinstance(route, dict) else route))
    for task in list(app.tasks.values()):
        found.add(_queue_name(getattr(task, "queue", None)))
    for entry in (conf.beat_schedule or {}).values():
        options = entry.get("options") if isinstance(entry, dict) else None
        found.add(_queue_name(options.get("queue") if isinstance(options, dict) else None))
    return {name for name in found if name}


def _queue_name(queue: object) -> str:
    name = getattr(queue, "name", queue)
    return name if isinstance(name, str) else ""


def _reading(app: Any) -> Any:
    """A kombu connection of a Celery application's for reading its queues, with short timeouts."""
    return app.connection_for_read(connect_timeout=READ_TIMEOUT_SECONDS, transport_options=_read_timeouts())


class _Kombu:
    """A kombu connection for reading, with short timeouts, and what reading a Redis broker needs of its channel."""

    def __init__(self, app: Any) -> None:
        self.connection = _reading(app)
        channel = self.connection.default_channel
        import redis

        self.client = redis.Redis(connection_pool=channel.pool)
        self.prefix = getattr(channel, "global_keyprefix", "") or ""
        self.sep = channel.sep
        self.steps = list(channel.priority_steps)

    def pipeline(self, transaction: bool) -> Any:
        return self.client.pipeline(transaction=transaction)

    def keys(self, queue: str) -> list[str]:
        """A queue's lists: itself, then one per priority step past 0, as kombu names them."""
        return [self.prefix + (queue if step == 0 else f"{queue}{self.sep}{step}") for step in self.steps]

    def close(self) -> None:
        self.connection.release()


class CeleryQueues:
    """The queues of a Celery application: Redis lists, or kombu's passive declare on any other transport, chosen at
    the first read, once the application is configured."""

    engine = "celery"

    def __init__(self, app: Any, queues: Queues) -> None:
        self._app = weakref.ref(app)  # an application that is gone is read no more
        self._queues = queues
        self._reader: Reader | None = None

    @property
    def alive(self) -> bool:
        return self._app() is not None

    def queues(self) -> list[str]:
        app = self._app()
        return [] if app is None else chosen(celery_names(app), self._queues)

    def read(self, queues: list[str]) -> list[Queue]:
        if self._reader is None:
            self._reader = self._made()
        return self._reader.read(queues)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def _made(self) -> Reader:
        app = self._app()
        if app is None:
            raise RuntimeError("the Celery application is gone")
        with app.connection_for_read() as unopened:  # a connection that is never opened: its transport's kind
            transport = unopened.transport.driver_type
        if transport == "redis":
            return RedisLists(self.engine, lambda: _Kombu(app), self.queues, _Kombu.keys, celery_scheduled_at)

        if transport != "amqp":
            # kombu's other transports answer a passive declare by making the queue (SQS, Azure Service Bus): a read
            # would change the broker. An in-memory broker has nothing that waits across processes.
            if transport != "memory":
                logger.warning(
                    "traced_tasks: the queues of Celery's %r transport are not read: only Redis and AMQP brokers are",
                    transport,
                )
            return _Unread(self.engine)

        return KombuQueues(self.engine, lambda: _reading(app), self.queues, consumers=True)


class _Unread:
    """The queues of a broker that cannot be read without changing it: none."""

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def queues(self) -> list[str]:
        return []

    def read(self, queues: list[str]) -> list[Queue]:
        return []

    def close(self) -> None:
        pass


def _sync_redis(pool: Any) -> Any:
    """A synchronous client for the server of a redis.asyncio connection pool, with short timeouts."""
    import redis

    given = dict(pool.connection_kwargs)
    kept = {key: given[key] for key in ("host", "port", "db", "username", "password", "path") if key in given}
    if "path" in kept:
        kept["unix_socket_path"] = kept.pop("path")
    ssl = "SSL" in getattr(pool.connection_class, "__name__", "")
    return redis.Redis(
        **kept, ssl=ssl, socket_timeout=READ_TIMEOUT_SECONDS, socket_connect_timeout=READ_TIMEOUT_SECONDS
    )


def taskiq_reader(broker: Any, queues: Queues) -> Reader | None:
    """The reader of a taskiq-redis broker's queue: a ListQueueBroker's list, a RedisStreamBroker's stream. None for
    other brokers, which tell nothing of what waits."""
    try:
        import taskiq_redis
    except ImportError:
        return None
    stream = getattr(taskiq_redis, "RedisStreamBroker", None)
    is_stream = stream is not None and isinstance(broker, stream)
    if not is_stream and not isinstance(broker, taskiq_redis.ListQueueBroker):
        return None
    pool = broker.connection_pool
    found = frozenset({broker.queue_name})

    def names() -> list[str]:
        return chosen(found, queues)

    def client() -> Any:
        return _sync_redis(pool)

    if is_stream:
        return RedisStream("taskiq", client, names, broker.consumer_group_name)
    return RedisLists("taskiq", client, names, lambda client, queue: [queue], taskiq_scheduled_at)
