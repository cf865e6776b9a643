"""Declaring the tasks at startup, so that their series exist at 0 before traffic."""

from __future__ import annotations

# --8<-- [start:example]
import traced_tasks


def send_receipt(order_id: int) -> None: ...


async def notify_partner(order_id: int) -> None: ...


traced_tasks.configure(namespace="shop")
traced_tasks.declare(send_receipt, notify_partner)  # after configure(), which starts without them
# --8<-- [end:example]
