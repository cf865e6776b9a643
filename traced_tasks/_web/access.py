"""Who may read traced_tasks' pages: a bearer token, read when serving, and HTTP only."""

from __future__ import annotations

import hmac
import logging

from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from traced_tasks._options import TOKEN

logger = logging.getLogger("traced_tasks")

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="traced_tasks"'}
_UNAUTHORIZED = PlainTextResponse("unauthorized\n", 401, CHALLENGE)


class Guard:
    """Lets a request through when it carries the token: `bearer_token`, or else TRACED_TASKS_METRICS_TOKEN read
    at each request, so a token set after the imports (load_dotenv()) still applies. Without either, everyone.

    The scheme is case-insensitive (RFC 9110); whitespace around the token is ignored, as Prometheus trims its
    credentials_file. Tokens are compared in constant time. A token variable that is set but blank (an empty
    secret file) lets no one in, and says so once. Websocket connections are refused with a close.
    """

    def __init__(self, bearer_token: str | None) -> None:
        if bearer_token is not None and not isinstance(bearer_token, str):
            raise TypeError(
                f"bearer_token must be a str (or None to read {TOKEN.name} at each request), got {bearer_token!r}"
            )
        if bearer_token is not None and not bearer_token.strip():
            raise ValueError("bearer_token is blank: pass the token, or None to read TRACED_TASKS_METRICS_TOKEN")
        self._token = bearer_token
        self._warned = False

    def allows(self, authorization: bytes) -> bool:
        """Whether a request with this Authorization header may read."""
        token = self._token if self._token is not None else TOKEN.read()
        if token is None:
            return True
        token = token.strip()
        if not token:
            if not self._warned:
                self._warned = True
                logger.error(
                    "traced_tasks: %s is set but blank; refusing every request until it holds a token", TOKEN.name
                )
            return False
        scheme, _, credentials = authorization.strip().partition(b" ")
        # Both sides compared whatever the scheme, so a wrong scheme takes as long as a wrong token.
        matches = hmac.compare_digest(credentials.strip(), token.encode())
        return matches and scheme.lower() == b"bearer"

    async def admit(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Whether the ASGI request may go on; if not, it has been answered."""
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008})  # policy violation: refused before accept
            return False
        given = next((value for name, value in scope.get("headers") or [] if name.lower() == b"authorization"), b"")
        if self.allows(given):
            return True
        await _UNAUTHORIZED(scope, receive, send)
        return False
