"""The configuration in force: what one `configure()` call chose, each choice made once."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec

from opentelemetry import metrics, trace
from prometheus_client import CollectorRegistry

from traced_tasks import _backends
from traced_tasks._activity import Activity
from traced_tasks._conventions import INSTRUMENTATION_NAME
from traced_tasks._labels import Labels
from traced_tasks._options import Options, counts_through_opentelemetry, option_names
from traced_tasks._profiles import Profiles
from traced_tasks._version import __version__

P = ParamSpec("P")

logger = logging.getLogger("traced_tasks")

# Instrumentation failures logged per kind and task name, up to this many; past it, nothing more is logged.
MAX_REPORTED = 100


class Configuration:
    """The tracer, the metrics backend, the task profiles and the activity record of one set of options."""

    def __init__(self, options: Options) -> None:
        self.options = options
        # With no provider this is the API's proxy tracer, which follows the global provider whenever it is set.
        self.tracer = trace.get_tracer(INSTRUMENTATION_NAME, __version__, tracer_provider=options.tracer_provider)
        self.activity = Activity()
        self.backend = _backends.choose(options, self.activity)
        self.labels = Labels(options.max_task_names, options.route_label, self.backend.series_limit())
        # Names and routes other processes admitted (earlier workers, in multiprocess mode) are in what /metrics
        # serves too: they count toward the caps, which then hold across a worker's processes.
        try:
            self.labels.admit_tasks(self.backend.known_task_names())
            if options.route_label:
                self.labels.admit_routes(self.backend.known_routes())
        except Exception:  # the folder cannot be read now: its names count toward the cap as they come back
            logger.exception("traced_tasks: cannot read the task names other processes counted")
        self.profiles = Profiles(self.labels, self.backend, options.max_task_names)
        self._reported: set[tuple[str, str]] = set()
        self._tracers: dict[int, tuple[trace.TracerProvider, trace.Tracer]] = {}
        self._lock = threading.Lock()
        _configurations.add(self)

    def declare(self, tasks: Iterable[Callable[..., Any]]) -> None:
        """Make the series of `tasks` exist now, at 0, as a first schedule would."""
        for task in tasks:
            try:
                self.profiles.get(task, None)
            except Exception:
                self.report("declaring", str(task))

    def tracer_for(self, provider: trace.TracerProvider) -> trace.Tracer:
        """traced_tasks' tracer from another provider: the one FastAPI's native telemetry traces a request with."""
        found = self._tracers.get(id(provider))
        if found is None:
            found = self._tracers[id(provider)] = (provider, provider.get_tracer(INSTRUMENTATION_NAME, __version__))
        return found[1]

    def report(self, part: str, task: str) -> None:
        """Log the exception being handled, once per part and task, so a broken exporter cannot flood the logs."""
        last = self._first(part, task)
        if last is not None:
            logger.exception(
                "traced_tasks: %s failed for task %s; it runs on without it, and this failure is not logged again%s",
                part,
                task,
                " (nor are further instrumentation failures of any task)" if last else "",
            )

    def warn(self, part: str, task: str, message: str) -> None:
        """Log a warning about a task, once per part and task, within the same bound as report()."""
        if self._first(part, task) is not None:
            logger.warning("traced_tasks: task %s %s", task, message)

    def _first(self, part: str, task: str) -> bool | None:
        """None when (part, task) was logged already, or too much was; else whether it is the last one logged."""
        with self._lock:
            if (part, task) in self._reported or len(self._reported) > MAX_REPORTED:
                return None
            self._reported.add((part, task))
            return len(self._reported) > MAX_REPORTED


_lock = threading.Lock()
_current: Configuration | None = None
# Every configuration still in use: the one in force, and those that runs scheduled earlier hold.
_configurations: weakref.WeakSet[Configuration] = weakref.WeakSet()


def configurations() -> list[Configuration]:
    return list(_configurations)


def _takes(options: Callable[P, object]) -> Callable[[Callable[..., None]], Callable[P, None]]:
    """Give the decorated function the keyword parameters of `options`, for type checkers and help()."""

    def decorate(function: Callable[..., None]) -> Callable[P, None]:
        function.__signature__ = inspect.signature(options).replace(return_annotation=None)  # type: ignore[attr-defined]
        return function

    return decorate


def declare(*tasks: Callable[..., Any]) -> None:
    """Make each task's series exist now, at 0, in the configuration in force: call it at startup, after
    configure(), whose new configuration starts without them.

    A task's series otherwise appear with its first schedule, a moment before its first run: its first failure or
    skip in a process then makes a series whose first scrape already reads 1, and increase() and the alerts built
    on it do not see it. Declared at startup, the series are scraped at 0 first, so every event counts:

        traced_tasks.declare(send_receipt, notify_partner, render_report)

    Declared tasks count toward max_task_names. With route_label=True the declared series have route="", since no
    request scheduled them yet. The Celery and taskiq integrations declare every task registered with them.
    """
    for task in tasks:
        if not callable(task):
            raise TypeError(f"declare() takes the tasks' callables, got {task!r}")
    current().declare(tasks)


@_takes(Options)
def configure(**options: Any) -> None:
    """Set how tasks scheduled from now on are traced and counted. Call it once, at startup.

    Every option has a default, and calling nothing at all works: spans go to the global tracer provider (whenever
    the application sets it) and metrics to prometheus_client's default registry.

        traced_tasks.configure(namespace="shop", max_task_names=200, isolate_tasks=True)

    Calling it again replaces the whole configuration, unregistering the previous metrics; tasks already scheduled
    finish under the configuration they were scheduled with. A bad value raises before anything changes. The
    providers the instrumentor was given, and the meter provider TRACED_TASKS_METRICS=opentelemetry chooses, are kept
    unless the call names its own: `tracer_provider` for spans, `meter_provider` or `registry` for counts.

    Args:
        tracer_provider: The TracerProvider task spans go to. None: the global one, whenever it is set.
        meter_provider: A MeterProvider to count through, with OpenTelemetry instruments, instead of
            prometheus_client. None: prometheus_client.
        registry: The prometheus_client registry to count in, and that /metrics serves. Default:
            prometheus_client.REGISTRY.
        namespace: A prefix for every metric name: "shop" gives shop_background_task_scheduled_total.
        buckets: Upper bounds in seconds of the run-time and wait histograms. Default: DEFAULT_BUCKETS, 5 ms to 1 h.
        max_task_names: Distinct task label values before further names count as "__overflow__". Default: 1000.
        use_span_links: True: each task starts a trace of its own, linked to the span that scheduled it.
        isolate_tasks: True: a failing task does not stop the rest of its batch.
        route_label: True: every metric family also gets a `route` label, the scheduling request's route template.
        queue_every: Seconds between two reads of the broker queues this process watches, at most. None:
            TRACED_TASKS_QUEUE_EVERY, or 15.
    """
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise TypeError(
            f"configure() got an unknown option {unknown[0]!r}; its options are {', '.join(option_names())}"
        )
    _install(Options(**_with_choices(options)))


def instrumented(**providers: Any) -> None:
    """Use the providers the instrumentor was given (and, unless it names a meter provider, the one the environment
    chooses), in the configuration in force and in later ones."""
    given = {**_environment_choice(), **{name: given for name, given in providers.items() if given is not None}}
    if not given:
        return
    _install(dataclasses.replace(current().options, **given))
    _instrumented.update(given)


def uninstrumented() -> None:
    _instrumented.clear()


# The tracer and meter providers the instrumentor was given: a later configure() keeps them.
_instrumented: dict[str, Any] = {}


def _with_choices(given: dict[str, Any]) -> dict[str, Any]:
    """`given`, with what the environment and the instrumentor chose for what it does not name."""
    chosen = {**_environment_choice(), **_instrumented}
    if "registry" in given or "meter_provider" in given:  # it names how to count
        chosen.pop("meter_provider", None)
    return {**chosen, **given}


def _environment_choice() -> dict[str, Any]:
    """TRACED_TASKS_METRICS=opentelemetry: count through the global MeterProvider, as opentelemetry-instrument sets
    it up from OTEL_METRICS_EXPORTER."""
    return {"meter_provider": metrics.get_meter_provider()} if counts_through_opentelemetry() else {}


def _install(options: Options) -> None:
    global _current
    configuration = Configuration(options)  # registers nothing yet: a failure here changes nothing
    with _lock:
        previous = _current
        if previous is not None:
            previous.backend.close()
        try:
            configuration.backend.open()
        except ValueError as exc:
            if previous is not None:
                previous.backend.open()
            raise ValueError(
                f"traced_tasks metrics are already registered in this registry by something else ({exc}); "
                "pass another namespace or registry to traced_tasks.configure()"
            ) from exc
        _current = configuration


def current() -> Configuration:
    """The configuration in force, made with the defaults on first use."""
    configuration = _current
    if configuration is None:
        configuration = _default()
    return configuration


def _default() -> Configuration:
    global _current
    with _lock:
        if _current is None:
            configuration = Configuration(Options(**_with_choices({})))
            try:
                configuration.backend.open()
            except ValueError:
                # Names taken in the default registry: count in a registry of our own, which metrics_app still
                # serves, rather than fail every add_task.
                logger.exception(
                    "traced_tasks: cannot register its metrics in prometheus_client's default registry; "
                    "they are served by traced_tasks.metrics_app only. Call traced_tasks.configure() "
                    "with another namespace or registry to choose"
                )
                configuration = Configuration(Options(**{**_with_choices({}), "registry": CollectorRegistry()}))
                configuration.backend.open()
            _current = configuration
        return _current
