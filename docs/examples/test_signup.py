"""Testing the tasks an endpoint schedules, with capture_tasks(): a test module, run by pytest."""

from __future__ import annotations

# --8<-- [start:example]
from fastapi import FastAPI
from fastapi.testclient import TestClient

from traced_tasks import BackgroundTasks
from traced_tasks.testing import capture_tasks


class PaymentDeclined(Exception):
    pass


def capture_payment(card: str) -> None:
    raise PaymentDeclined("declined")


def send_receipt(order_id: int) -> None: ...


app = FastAPI()


@app.post("/orders/{order_id}")
def place_order(order_id: int, card: str, tasks: BackgroundTasks) -> dict[str, int]:
    tasks.add_task(capture_payment, card)
    tasks.add_task(send_receipt, order_id)
    return {"order_id": order_id}


def test_a_declined_card_is_recorded() -> None:
    # TestClient runs the background tasks before it returns, and by default raises their
    # exceptions: the response went out already, so let it return, and read the runs instead.
    client = TestClient(app, raise_server_exceptions=False)
    with capture_tasks() as runs:
        assert client.post("/orders/7", params={"card": "4000 0000 0000 0002"}).status_code == 200
    assert [(run.task, run.status, run.exception) for run in runs] == [
        (f"{__name__}.capture_payment", "error", "PaymentDeclined"),
        (f"{__name__}.send_receipt", "skipped", None),
    ]


# --8<-- [end:example]
