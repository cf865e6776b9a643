"""Take the README's screenshot of the task console, from a real run of the demo shop.

    make screenshot      # or: .venv/bin/python examples/screenshot.py docs/console.png

It starts examples/demo.py, lets it serve its own traffic for half a minute (long enough for its ledger task to
count as hung, with DEMO_HUNG_AFTER=20), and photographs /tasks/ in headless Chromium (Debian's chromium and
chromium-driver packages, driven by selenium).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import ROOT, chromium, clean_environment, free_port, wait_for_http


def main(target: Path) -> None:
    port = free_port()
    env = clean_environment(
        DEMO_PORT=str(port),
        DEMO_WORKER_PORT=str(free_port()),
        DEMO_BEAT_PORT=str(free_port()),
        DEMO_HUNG_AFTER="20",
        DEMO_TRACE_URL="http://localhost:16686/trace/{trace_id}",
    )
    demo = subprocess.Popen([sys.executable, "examples/demo.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/tasks/"
        wait_for_http(url)
        time.sleep(35)
        with tempfile.TemporaryDirectory() as profile:
            driver = chromium(Path(profile), width=1400, height=900)
            try:
                driver.get(url)
                time.sleep(4)  # the first refresh
                driver.save_screenshot(str(target))
            finally:
                driver.quit()
    finally:
        demo.terminate()
        demo.wait(timeout=30)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "console.png")
