"""gunicorn settings for a service using traced_tasks in multiprocess mode.

PROMETHEUS_MULTIPROC_DIR=/run/shop-metrics gunicorn -c examples/gunicorn.conf.py app:app
"""

from typing import Any

from prometheus_client import multiprocess

worker_class = "uvicorn.workers.UvicornWorker"
workers = 4


def child_exit(server: Any, worker: Any) -> None:
    # The dead worker's running tasks no longer count as in progress. metrics_app also does this on each
    # scrape for workers it finds gone; the hook does it at once.
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
