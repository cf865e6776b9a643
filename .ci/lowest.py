"""Print the requirements of the run at the declared lower bounds: every dependency and extra of pyproject.toml at
its lowest version (`starlette>=0.37.2` becomes `starlette==0.37.2`), then the tools the test suite runs with, at
whatever versions fit those."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
extras = project["optional-dependencies"]
declared = [*project["dependencies"], *(req for name, reqs in extras.items() if name != "dev" for req in reqs)]
pinned: dict[str, str] = {}
for requirement in declared:
    match = re.fullmatch(r"([A-Za-z0-9_.\[\]-]+)>=([^,;]+)", requirement)
    if match is None:
        sys.exit(f"{requirement!r}: every dependency needs a lower bound, written name>=version")
    pinned.setdefault(match.group(1), f"{match.group(1)}=={match.group(2)}")
# The test tools: exact pins kept, lower bounds left to the resolver, which fits them to the pins above; the linters,
# the type checker and the documentation site are checked once, on the default Python.
tools = [
    requirement if "==" in requirement else re.split(r"[<>=]", requirement)[0]
    for requirement in extras["dev"]
    if re.split(r"[<>=\[]", requirement)[0] not in pinned
    and not requirement.startswith(("mypy", "ruff", "types-", "mkdocs"))
]
print("\n".join([*pinned.values(), *tools]))
