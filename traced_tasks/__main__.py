"""traced_tasks' command line: the Grafana dashboards and Prometheus rules it ships, written to a folder.

python -m traced_tasks dashboards ./monitoring
python -m traced_tasks dashboards ./monitoring --runbooks https://docs.example.com/traced-tasks/runbooks/
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

FILES = ("overview.json", "task.json", "rules.yml", "rules.test.yml")
# Where the rules' runbook_url point to: this project's site, unless --runbooks names another.
RUNBOOKS = "https://traced-tasks.github.io/traced-tasks/runbooks/"


def shipped(name: str) -> str:
    """A shipped file's text: in the package of an installed wheel, or in the dashboards folder of a checkout."""
    packaged = resources.files("traced_tasks").joinpath("dashboards").joinpath(name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "dashboards" / name).read_text(encoding="utf-8")


def write(folder: Path, runbooks: str = RUNBOOKS) -> list[Path]:
    """Write the dashboards and rules into `folder`, the rules' runbook_url under `runbooks`; the files written."""
    if not runbooks.startswith(("http://", "https://")):
        raise ValueError(f"--runbooks must be the http(s) URL of the runbooks' folder, got {runbooks!r}")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FILES:
        text = shipped(name)
        if name.startswith("rules"):
            text = text.replace(RUNBOOKS, runbooks.rstrip("/") + "/")
        path = folder / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m traced_tasks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    dashboards = commands.add_parser(
        "dashboards", help="write the Grafana dashboards and the Prometheus rules, with their tests, to a folder"
    )
    dashboards.add_argument("folder", type=Path)
    dashboards.add_argument(
        "--runbooks",
        default=RUNBOOKS,
        help=f"the URL of the runbooks' folder, for a self-hosted site (default {RUNBOOKS})",
    )
    arguments = parser.parse_args(argv)
    try:
        for path in write(arguments.folder, arguments.runbooks):
            print(f"wrote {path}")
    except (OSError, ValueError) as exc:
        print(f"python -m traced_tasks dashboards: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
