"""The dashboards and rules as files: structure, Grafana dashboard-linter rules, promtool checks and unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

import traced_tasks
from tests.apps.tasks import fail, ok, run
from tests.dashboards import (
    COUNTER_SUFFIXES,
    DASHBOARD_FILES,
    DASHBOARDS,
    ROOT,
    RULES,
    load,
    metric_names,
    panels,
    queries,
    rules,
)
from tests.support import require_tool
from traced_tasks import _conventions as names
from traced_tasks import _sampled

PREFIX = names.PREFIX
DEPLOY = ROOT / "deploy"


class EverySampledFamily:
    """A source of one sample of each family sampled from queues and schedulers, as a watched queue and a scheduler
    give them."""

    def begin_read(self) -> None:
        return None

    def samples(self) -> list[_sampled.Sample]:
        return [
            _sampled.Sample(family, tuple("x" for _ in family.labels or ()), 1.0) for family in names.SAMPLED_FAMILIES
        ]


def exposed_names() -> set[str]:
    """Every sample name the library exposes, read from real scrapes after tasks succeed, fail and are skipped, and
    from a scrape while a task runs, with a queue and a schedule sampled."""
    registry = CollectorRegistry()
    traced_tasks.configure(registry=registry)
    client = TestClient(traced_tasks.make_metrics_app(registry))
    scraped: list[str] = []
    source = EverySampledFamily()
    _sampled.add(source)
    try:
        run((ok, ()), (fail, ()), (ok, ()))
        run((lambda: scraped.append(client.get("/").text), ()))
        scraped.append(client.get("/").text)
    finally:
        _sampled.remove(source)
        traced_tasks.configure(registry=CollectorRegistry())
    lines = [line for text in scraped for line in text.splitlines() if line and not line.startswith("#")]
    return {line.split("{")[0].split(" ")[0] for line in lines}


def test_dashboards_are_generated() -> None:
    """The committed JSON is exactly what dashboards/generate.py writes, so edits go through the generator."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", DASHBOARDS / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert sorted(generate.DASHBOARDS) == [path.name for path in DASHBOARD_FILES]
    for path in DASHBOARD_FILES:
        assert path.read_text() == generate.render(path.name), f"{path.name} is stale: run dashboards/generate.py"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_dashboard_metadata(path: Path) -> None:
    """Each dashboard has a stable uid of at most 40 characters, schemaVersion 39 or newer, tags and a description."""
    dashboard = load(path)
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["tags"]
    assert dashboard["description"]
    assert dashboard["title"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_template_variables(path: Path) -> None:
    """A datasource variable of Prometheus type, and job, instance and task variables, multi-select with All."""
    variables = {variable["name"]: variable for variable in load(path)["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "task"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] is True
        assert variables[name]["includeAll"] is True
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.name)
def test_linter_rules(path: Path) -> None:
    """grafana/dashboard-linter's main rules: panel and target datasource is ${datasource}, every panel has a unit
    and a description, rate() and increase() windows are $__rate_interval (or $__range in instant table queries),
    and counters appear only inside rate() or increase()."""
    problems: list[str] = []
    for panel in panels(load(path)):
        title = panel["title"]
        if panel.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
            problems.append(f"{title}: panel datasource")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{title}: no unit")
        if not panel.get("description"):
            problems.append(f"{title}: no description")
        for target in panel["targets"]:
            if target.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
                problems.append(f"{title}: target datasource")
            problems += [f"{title}: {problem}" for problem in lint_expr(target["expr"], bool(target.get("instant")))]
    assert problems == []


def lint_expr(expr: str, instant: bool) -> list[str]:
    problems = []
    allowed = {"$__rate_interval", "$__range"} if instant else {"$__rate_interval"}
    for function, window in re.findall(r"\b(rate|increase)\([^\[]*\[([^\]]+)\]", expr):
        if window not in allowed:
            problems.append(f"{function} over [{window}]")
    for name in metric_names(expr):
        if name.endswith(COUNTER_SUFFIXES):
            wrapped = len(re.findall(rf"\b(?:rate|increase)\(\s*{name}\{{[^}}]*\}}\[[^\]]+\]\)", expr))
            if wrapped != len(re.findall(rf"\b{name}\b", expr)):
                problems.append(f"{name} outside rate()/increase()")
    return problems


def test_lint_catches_mistakes() -> None:
    """The linter helper itself: it flags a fixed window, a bare counter and a counter in sum() without rate()."""
    skipped = names.SKIPPED.total
    assert lint_expr(f'rate({skipped}{{job="a"}}[5m])', instant=False) == ["rate over [5m]"]
    assert lint_expr(f"sum({skipped})", instant=False) == [f"{skipped} outside rate()/increase()"]
    assert lint_expr(f"sum(rate({skipped}{{}}[$__range]))", instant=False) == ["rate over [$__range]"]
    assert lint_expr(f"sum(rate({skipped}{{}}[$__range]))", instant=True) == []


def test_every_metric_used_is_exposed() -> None:
    """Each metric name a dashboard query or rule uses is one the library really exposes."""
    exposed = exposed_names() | {"up"}
    used = {name for query in queries() for name in metric_names(query.expr)}
    used |= {name for rule in rules() for name in metric_names(rule["expr"])}
    assert names.DURATION.bucket in used
    assert sorted(used - exposed) == []


def test_dashboards_cover_every_family() -> None:
    """Every metric family shows up somewhere on the overview dashboard."""
    used = {name for query in queries() if query.dashboard == "overview.json" for name in metric_names(query.expr)}
    families = {
        names.SCHEDULED.total,
        names.WAIT.bucket,
        names.DURATION.count,
        names.DURATION.bucket,
        names.IN_PROGRESS.name,
        names.EXCEPTIONS.total,
        names.SKIPPED.total,
        names.IN_PROGRESS_SINCE.name,
        names.QUEUE_DEPTH.name,
        names.QUEUE_OLDEST.name,
        names.QUEUE_CONSUMERS.name,
        names.SCHEDULE_PERIOD.name,
        names.SCHEDULE_NEXT.name,
    }
    assert families <= used


def test_percentiles_show_exemplars_and_task_links_to_jaeger() -> None:
    """Duration percentile targets have exemplars on; the per-task dashboard links to Jaeger's search for the task."""
    for path in DASHBOARD_FILES:
        for panel in panels(load(path)):
            if "percentiles" in panel["title"]:
                assert all(target.get("exemplar") is True for target in panel["targets"])
    task = load(DASHBOARDS / "task.json")
    links = [link["url"] for panel in panels(task) for link in panel.get("links", [])]
    links += [link["url"] for panel in panels(task) for link in panel["fieldConfig"]["defaults"].get("links", [])]
    assert any("/search?service=${service}&operation=BackgroundTask%20${task}" in link for link in links)
    assert any("${__field.labels.task}" in link for link in links)
    assert [panel["type"] for panel in panels(task)].count("heatmap") == 1


def test_rules_pass_promtool_lint() -> None:
    """promtool check rules --lint=all accepts the rule file."""
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "rules", "--lint=all", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(list(rules()))} rules found" in result.stdout


def test_rule_unit_tests() -> None:
    """promtool test rules: every alert is tested firing and not firing, and all tests pass."""
    promtool = require_tool("promtool")
    tests = yaml.safe_load((DASHBOARDS / "rules.test.yml").read_text())
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert firing == alerts
    assert silent == alerts
    assert all("interval" in test for test in tests["tests"])  # Prometheus 2.42 requires it
    result = subprocess.run(
        [promtool, "test", "rules", "rules.test.yml"], cwd=DASHBOARDS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_recording_rule_names_follow_level_metric_operations() -> None:
    """Recording rules are named level:metric:operations, and library metric names themselves have no colon."""
    recorded = [rule["record"] for rule in rules() if "record" in rule]
    assert recorded
    for name in recorded:
        level, metric, operations = name.split(":")
        assert re.fullmatch(r"[a-z_]+", level), name
        assert metric.startswith(PREFIX), name
        assert re.fullmatch(r"[a-z0-9_]+", operations), name
    assert all(":" not in name for name in exposed_names())


def test_alerts_are_complete_and_have_runbooks() -> None:
    """Each alert has a for, a severity, a summary, a templated description and a runbook_url to its page of the
    documentation site, whose source exists (tests/test_docs.py opens it in the built site)."""
    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["site_url"]
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["for"], rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        annotations: dict[str, Any] = rule["annotations"]
        assert annotations["summary"]
        assert "{{ $labels." in annotations["description"]
        page = rule["alert"].lower()
        assert annotations["runbook_url"] == f"{site}runbooks/{page}/"
        assert (ROOT / "docs" / "runbooks" / f"{page}.md").is_file()


def test_stack_prometheus_config(tmp_path: Path) -> None:
    """promtool check config accepts the stack's Prometheus config with the rules mounted beside it."""
    promtool = require_tool("promtool")
    shutil.copy(DEPLOY / "prometheus" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(RULES, tmp_path / "rules.yml")
    result = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(list(rules()))} rules found" in result.stdout


def test_stack_is_wired_together() -> None:
    """The compose file, Prometheus and Grafana provisioning agree: ports, paths, mounts and datasource uids."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / source).resolve().exists(), volume
    assert (DEPLOY / services["demo"]["build"]["context"] / services["demo"]["build"]["dockerfile"]).is_file()

    prometheus = services["prometheus"]
    assert "--enable-feature=exemplar-storage" in prometheus["command"]
    assert f"{(DEPLOY / '../dashboards/rules.yml').resolve()}" == str(RULES)
    assert "../dashboards/rules.yml:/etc/prometheus/rules.yml:ro" in prometheus["volumes"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics/"
    port = services["demo"]["environment"]["DEMO_PORT"]
    assert job["static_configs"][0]["targets"] == [f"demo:{port}"]
    assert services["demo"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert "4318:4318" in services["jaeger"]["ports"]

    grafana = services["grafana"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/datasources.yaml").read_text())
    by_type = {source["type"]: source for source in datasources["datasources"]}
    destination = by_type["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destination == [{"name": "trace_id", "datasourceUid": by_type["jaeger"]["uid"]}]
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yaml").read_text())
    (provider,) = providers["providers"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in grafana["volumes"])
    assert mounts["../dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_metric_names_are_written_in_one_place() -> None:
    """No Python file but traced_tasks/_conventions.py spells out a metric name, so a rename happens there or nowhere;
    the dashboards, the rules' tests and the tests read it."""
    spelled = re.compile(rf"(?<![\w:]){PREFIX}[a-z_]+")
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for folder in ("traced_tasks", "dashboards", "tests", "benchmarks", "examples")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "_conventions.py"
        for match in spelled.finditer(path.read_text())
    ]
    assert found == []


def test_the_consoles_thresholds_are_the_alerts() -> None:
    """The console flags a run hung, a queue behind or unread, and a periodic task overdue, at the thresholds the
    shipped alerts fire at, and the Schedules panel's overdue flag uses the same grace: one number each."""
    from traced_tasks import _options

    expressions = {rule["alert"]: " ".join(rule["expr"].split()) for rule in rules() if "alert" in rule}

    def threshold(alert: str, pattern: str) -> float:
        found = re.search(pattern, expressions[alert])
        assert found is not None, expressions[alert]
        return float(found.group(1))

    assert threshold("BackgroundTaskHung", r"> (\d+)$") == _options.HUNG_AFTER_SECONDS
    assert threshold("BackgroundTaskBacklogOld", r"> (\d+)$") == _options.BACKLOG_AGE_SECONDS
    assert threshold("BackgroundTaskQueueUnread", r"> (\d+)$") == _options.QUEUE_STALE_SECONDS
    assert threshold("BackgroundTaskScheduleOverdue", r"\+ (\d+)$") == _options.SCHEDULE_GRACE_SECONDS
    (overdue,) = [query for query in queries() if query.panel == "Schedules" and "> bool" in query.expr]
    assert overdue.expr.endswith(f"+ {_options.SCHEDULE_GRACE_SECONDS:.0f}")


def test_the_dashboards_travel_in_the_wheel_and_are_written_where_asked(tmp_path: Path) -> None:
    """The built wheel holds the dashboards and rules in the package; `python -m traced_tasks dashboards <folder>`
    writes them there, as shipped but for the rules' runbook_url, which --runbooks points to a self-hosted site; and
    the written rules pass their own promtool tests."""
    wheel = tmp_path / "wheel"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheel), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (found,) = wheel.glob("traced_tasks-*.whl")
    with zipfile.ZipFile(found) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("traced_tasks/dashboards/")}
    assert packaged == {
        f"traced_tasks/dashboards/{name}" for name in ("overview.json", "task.json", "rules.yml", "rules.test.yml")
    }
    folder = tmp_path / "monitoring"
    base = "https://docs.example.com/traced-tasks/runbooks/"
    result = subprocess.run(
        [sys.executable, "-m", "traced_tasks", "dashboards", str(folder), "--runbooks", base],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (folder / "overview.json").read_text() == (DASHBOARDS / "overview.json").read_text()
    urls = [
        rule["annotations"]["runbook_url"]
        for rule in yaml.safe_load((folder / "rules.yml").read_text())["groups"][1]["rules"]
    ]
    assert len(urls) == 14
    assert all(url.startswith(base) for url in urls)
    promtool = require_tool("promtool")
    tested = subprocess.run([promtool, "test", "rules", "rules.test.yml"], cwd=folder, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
