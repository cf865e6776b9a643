"""Instructions and data cache misses per task, counted under valgrind's cachegrind.

    make bench-instructions                     # needs valgrind (apt install valgrind); a few minutes
    python -m benchmarks.instructions --few 500 --more 2500

Counts move far less between runs than the times `python -m benchmarks` measures on a noisy machine. Each variant of
`python -m benchmarks` runs in a process of its own under cachegrind, twice: with few batches of one async task and
with more. The difference, divided by the difference in batches, is one batch's cost, with the start-up and warm-up
that both runs share taken out. Reported: instructions, and misses of cachegrind's simulated first-level data cache
(the host's geometry, as cachegrind detects it), each as overhead over bare Starlette and as a ratio to the span
wrappers' overhead. Counts, not times: a variant can run fewer instructions and still take longer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from benchmarks.__main__ import ROOT, multiprocess_folder, noop_async, time_batches, variants

VARIANTS = ("bare", "span-only", "span+attrs", "traced_tasks")
WARM_UP = 500  # batches run first in both runs, which the subtraction removes: caches, span queue, interpreter


class Counts(NamedTuple):
    """Per batch: instructions executed, and first-level data cache misses (reads and writes)."""

    instructions: float
    data_misses: float


def child(variant: str, sdk: bool, batches: int) -> None:
    """Run `batches` batches of `variant` after the warm-up: the process cachegrind counts."""
    classes, close = variants(sdk, multiprocess_folder())
    chosen = classes[variant]
    if chosen.prepare is not None:
        chosen.prepare()

    async def main() -> None:
        await time_batches(chosen.tasks_class, noop_async, WARM_UP)
        await time_batches(chosen.tasks_class, noop_async, batches)

    asyncio.run(main())
    close()


def totals(out_file: Path) -> dict[str, int]:
    """The whole-program totals of a cachegrind output file, by event name."""
    events: list[str] = []
    for line in out_file.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            return dict(zip(events, map(int, line.split()[1:]), strict=True))
    raise ValueError(f"{out_file}: no summary line")


def count(valgrind: str, variant: str, sdk: bool, batches: int, folder: str) -> dict[str, int]:
    """The totals of one child process under cachegrind. A failed run raises with what it wrote to stderr; what a run
    that succeeded wrote there, beyond valgrind's own notes, is passed on (a span queue that dropped spans, say)."""
    out_file = Path(folder) / f"{variant}-{sdk}-{batches}.out"
    command = [valgrind, "--tool=cachegrind", "--cache-sim=yes", "-q", f"--cachegrind-out-file={out_file}"]
    command += [sys.executable, "-m", "benchmarks.instructions", "--child", variant, str(int(sdk)), str(batches)]
    # One hash seed for every child: string hashing decides where a dict's keys go, and so some of its misses.
    environment = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} ({batches} batches) under cachegrind:\n{done.stderr}")
    said = [line for line in done.stderr.splitlines() if not line.startswith(("--", "=="))]  # valgrind's: --pid--
    if said:
        print(f"{variant} ({batches} batches) wrote to stderr:", *said, sep="\n  ", file=sys.stderr)
    return totals(out_file)


def per_batch(low: dict[str, int], high: dict[str, int], batches: int) -> Counts:
    """One batch's counts: the difference between a longer run's totals and a shorter one's, per batch between."""
    return Counts(
        (high["Ir"] - low["Ir"]) / batches,
        (high["D1mr"] + high["D1mw"] - low["D1mr"] - low["D1mw"]) / batches,
    )


def report(title: str, counts: dict[str, Counts], baseline: str) -> None:
    bare = counts["bare"]
    print(f"\n{title}")
    print(f"  {'variant':<14}{'instructions':>14}{'over bare':>11}{'D1 misses':>11}{'over bare':>11}")
    for name, found in counts.items():
        print(
            f"  {name:<14}{found.instructions:>14,.0f}{found.instructions - bare.instructions:>11,.0f}"
            f"{found.data_misses:>11,.0f}{found.data_misses - bare.data_misses:>11,.0f}"
        )
    ours, theirs = counts["traced_tasks"], counts[baseline]
    for label, field in (("instructions", 0), ("D1 misses", 1)):
        added = (ours[field] - bare[field]) / (theirs[field] - bare[field])
        print(f"  traced_tasks overhead ÷ {baseline} overhead, {label}: {added:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--few", type=int, default=500, help="batches of the shorter run")
    parser.add_argument("--more", type=int, default=2500, help="batches of the longer run")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "SDK", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.more <= args.few:
        parser.error("--more must be greater than --few")
    if args.child is not None:
        variant, sdk, batches = args.child
        child(variant, sdk == "1", int(batches))
        return
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("valgrind is not installed: apt install valgrind")
    print(f"python {platform.python_version()} on {platform.machine()}, cachegrind, {args.more - args.few} batches")
    runs = [(sdk, name, batches) for sdk in (True, False) for name in VARIANTS for batches in (args.few, args.more)]
    with (
        tempfile.TemporaryDirectory(prefix="traced_tasks_instructions_") as folder,
        ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
    ):
        totals_of_runs = pool.map(lambda run: count(valgrind, run[1], run[0], run[2], folder), runs)
        found = dict(zip(runs, totals_of_runs, strict=True))
    for sdk, baseline in ((True, "span+attrs"), (False, "span-only")):
        counts = {
            name: per_batch(found[sdk, name, args.few], found[sdk, name, args.more], args.more - args.few)
            for name in VARIANTS
        }
        title = f"per async task, {'SDK + BatchSpanProcessor' if sdk else 'no SDK (API no-op tracer)'}"
        report(title, counts, baseline)


if __name__ == "__main__":
    main()
