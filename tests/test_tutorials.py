"""The tutorial pages, followed to the letter by a reader in an empty folder: each file the page shows is saved under
its title, each command the page gives is run, in the page's order, and each output the page promises is checked.

How a page is read:

- a code block with a title that names a file (```python title="shop/tasks.py"```) is saved there, as the site
  shows it (its `--8<--` includes resolved by pymdownx.snippets, as mkdocs builds it);
- a ```sh block titled `Terminal 1`, `Terminal 2`... is typed into that terminal, a command a line (`\\` continues
  one); comment lines under a command are what it prints, to the line (a command is tried again, as a reader
  would while a server starts or a worker has yet to run the task, until it succeeds and prints that);
- the last command a terminal runs before the page goes on in another terminal keeps running there (a server or a
  worker): it runs in the background until the page is done, and must still be running then;
- `http://localhost:...` links in the page's text are pages the reader opens: each answers 200.

The reader has a fresh virtual environment, where the page's own `pip install` commands install the checkout: it is
built once as a wheel, beside the wheels of everything its extras need, and pip is pointed at that folder and at no
index. So a page runs with what its extras bring, and nothing else. The pages' ports (8000, 9100) are replaced with
free ones, and Redis is at REDIS_URL, a redis-server of the test's own."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ROOT, Process, clean_environment, free_port, redis_server

DOCS = ROOT / "docs"
PAGES = ["getting-started.md", "fastapi.md", "starlette.md", "engines/celery.md", "engines/taskiq.md"]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
ATTRIBUTE = re.compile(r'(\w+)="([^"]*)"')
TERMINAL = re.compile(r"Terminal \d+")
LINK = re.compile(r"http://localhost:\d+/[^\s>)]*")
PORTS = ("8000", "9100")  # uvicorn's default, and the workers' metrics port the engine pages choose
EXTRAS = "fastapi,celery,taskiq"  # all that the pages install
PATIENCE = 60.0  # seconds a reader waits, trying a command again, for what the page says it does


@dataclass
class Block:
    language: str
    title: str
    body: str


@dataclass
class Command:
    terminal: str
    line: str
    output: list[str] = field(default_factory=list)  # what the page says it prints, if it says
    keeps_running: bool = False


def blocks(text: str) -> list[Block]:
    return [
        Block(language, dict(ATTRIBUTE.findall(info)).get("title", ""), body)
        for language, info, body in FENCE.findall(text)
    ]


def commands(terminal: str, body: str) -> list[Command]:
    """A shell block's commands, with the output that the comment lines under each one show."""
    found: list[Command] = []
    for line in re.sub(r"\\\n\s*", "", body).splitlines():
        if line.startswith("#"):
            if found:  # a comment above the block's first command is a remark, not output
                found[-1].output.append(line.removeprefix("#").strip())
        elif line.strip():
            found.append(Command(terminal, line.strip()))
    return found


def expanded(page: str) -> str:
    """The page's Markdown with its includes resolved by pymdownx.snippets, configured as mkdocs.yml configures it
    for the site."""
    why = "the pages are read where the documentation tools are installed"
    pytest.importorskip("pymdownx", reason=why)
    markdown = pytest.importorskip("markdown", reason=why)
    extensions = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["markdown_extensions"]
    snippets = next(entry for entry in extensions if isinstance(entry, dict) and "pymdownx.snippets" in entry)
    config = {**snippets["pymdownx.snippets"]}
    config["base_path"] = [str(ROOT / path) for path in config["base_path"]]
    reader = markdown.Markdown(extensions=["pymdownx.snippets"], extension_configs={"pymdownx.snippets": config})
    return "\n".join(reader.preprocessors["snippet"].run((DOCS / page).read_text().splitlines()))


@pytest.mark.parametrize("page", PAGES)
def test_each_block_is_a_file_or_a_terminals_commands(page: str) -> None:
    """Every code block of a tutorial page is a file a reader saves, titled with its path, or commands to type into
    a terminal the block's title names: nothing a reader has to guess where to put."""
    found = blocks((DOCS / page).read_text())
    assert found
    for block in found:
        if block.language == "sh":
            assert TERMINAL.fullmatch(block.title), f"{page}: a shell block without a terminal:\n{block.body}"
        else:
            assert block.title, f"{page}: a block that is neither a file nor a terminal's:\n{block.body}"
            assert not Path(block.title).is_absolute(), block.title
            assert ".." not in Path(block.title).parts, block.title


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout built as a wheel, beside the wheels of everything its EXTRAS need: what the pages' pip
    commands install from, offline."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder), f"{ROOT}[{EXTRAS}]"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr
    return folder


class Reader:
    """A reader following one page in an empty folder, with a virtual environment and terminals of their own."""

    def __init__(self, page: str, folder: Path, wheelhouse: Path, redis: str) -> None:
        self.page = page
        self.folder = folder / "reader"
        self.folder.mkdir()
        self.logs = folder
        venv = folder / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        self.ports = {port: str(free_port()) for port in PORTS}
        self.env = clean_environment(
            PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            VIRTUAL_ENV=str(venv),
            PIP_NO_INDEX="1",
            PIP_FIND_LINKS=str(wheelhouse),
            REDIS_URL=redis,
            UVICORN_PORT=self.ports["8000"],
        )
        self.env.pop("PYTHONPATH")  # the reader's Python sees what the page installed, not the checkout
        self.running: dict[str, Process] = {}

    def ported(self, text: str) -> str:
        return re.sub(r"\b(8000|9100)\b", lambda match: self.ports[match.group(1)], text)

    def save(self, block: Block) -> None:
        path = self.folder / block.title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.body)

    def run(self, command: Command) -> None:
        assert command.terminal not in self.running, f"{command.line}: {command.terminal} is busy"
        line = self.ported(command.line)
        if command.keeps_running:
            log = self.logs / f"{command.terminal.replace(' ', '-')}.log"
            shell = ["bash", "-c", f"cd {shlex.quote(str(self.folder))} && {line}"]
            self.running[command.terminal] = Process(shell, log, **{**self.env, "PYTHONPATH": ""})
            return
        # As a reader would, try again while a server starts or a worker has yet to run the task.
        deadline = time.monotonic() + PATIENCE
        while True:
            returncode, out, err = self.attempt(line, deadline)
            printed = [output.rstrip() for output in out.splitlines() if output.strip()]
            if returncode == 0 and (not command.output or printed == command.output):
                return
            if time.monotonic() > deadline or self.stopped():
                raise AssertionError(
                    f"{self.page}: `{line}` exited {returncode}, printing\n{out}{err}\n"
                    f"where the page shows\n{chr(10).join(command.output)}\n{self.report()}"
                )
            time.sleep(0.2)

    def attempt(self, line: str, deadline: float) -> tuple[int, str, str]:
        """Run a command to its end, in a process group of its own, which goes if it outlives the deadline."""
        process = subprocess.Popen(
            ["bash", "-c", line],
            cwd=self.folder,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            err += "\n(it did not end: a server or a worker should be the last command before another terminal)"
            return -1, out, err
        return process.returncode, out, err

    def open(self, url: str) -> None:
        response = httpx.get(self.ported(url), timeout=30)
        assert response.status_code == 200, f"{self.page}: {url} answered {response.status_code}\n{self.report()}"

    def imports(self, files: list[str]) -> None:
        """Every Python file the page shows imports in the reader's environment: complete, and its imports
        installed by the page's commands."""
        modules = [path.removesuffix(".py").replace("/", ".") for path in files if path.endswith(".py")]
        if modules:
            code = f"import {', '.join(modules)}"
            result = subprocess.run(
                [str(Path(self.env["VIRTUAL_ENV"]) / "bin" / "python"), "-c", code],
                cwd=self.folder,
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            assert result.returncode == 0, f"{self.page}: {code}\n{result.stderr}"

    def stopped(self) -> list[str]:
        """The terminals whose server or worker is no longer running."""
        return [name for name, process in self.running.items() if process.process.poll() is not None]

    def report(self) -> str:
        return "\n".join(f"--- {name}:\n{process.output()[-3000:]}" for name, process in self.running.items())

    def stop(self) -> None:
        for process in self.running.values():
            process.stop(grace=2)


@contextlib.contextmanager
def reading(page: str, folder: Path, wheelhouse: Path) -> Iterator[Reader]:
    with redis_server(folder / "redis") as redis:
        reader = Reader(page, folder, wheelhouse, redis)
        try:
            yield reader
        finally:
            reader.stop()


@pytest.mark.integration
@pytest.mark.parametrize("page", PAGES)
def test_the_page_runs_as_written(page: str, tmp_path: Path, wheelhouse: Path) -> None:
    """A reader who saves the page's files, types its commands, and opens its links, in an empty folder and a
    virtual environment where only the page's pip commands installed anything, sees what the page says: the
    servers and workers it starts keep running, its commands print what it shows, its links answer."""
    text = expanded(page)
    steps: list[Block | Command] = []
    for block in blocks(text):
        assert block.title, f"{page}: a block without a title, neither a file nor a terminal's:\n{block.body}"
        steps.extend(commands(block.title, block.body) if block.language == "sh" else [block])
    typed = [step for step in steps if isinstance(step, Command)]
    assert typed
    for command, after in itertools.pairwise(typed):
        command.keeps_running = after.terminal != command.terminal
    with reading(page, tmp_path, wheelhouse) as reader:
        for step in steps:
            if isinstance(step, Block):
                reader.save(step)
            else:
                reader.run(step)
        for url in LINK.findall(FENCE.sub("", text)):
            reader.open(url)
        reader.imports([step.title for step in steps if isinstance(step, Block)])
        assert reader.stopped() == [], f"{page}: what these terminals started did not keep running\n{reader.report()}"
