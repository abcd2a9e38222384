"""Files served to the browser that made them, and to no one else.

Gradio serves every file in its cache to whoever asks for its URL (``/gradio_api/file=...``);
without ``--auth`` nothing ties a request to a session. This ASGI middleware (installed through
``launch(app_kwargs={"middleware": ...})``) gives every browser a random, HttpOnly,
SameSite=Strict cookie, and answers 404 to a file request for a registered file (a session's
export) unless it carries the cookie of the browser it was made for. Files Gradio caches on its
own (chip images) are not registered: their URLs hold a hash of a per-install secret and the
content, and they are removed by age (``delete_cache``).
"""

from __future__ import annotations

import secrets
import threading
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import unquote

COOKIE = "rsvlm-client"


class FileOwners:
    """Which browser (cookie value) may fetch which served file."""

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    def register(self, path: str | Path, client: str | None) -> None:
        if client:
            with self._lock:
                self._owners[str(Path(path).resolve())] = client

    def forget(self, path: str | Path) -> None:
        with self._lock:
            self._owners.pop(str(Path(path).resolve()), None)

    def allowed(self, path: str, client: str | None) -> bool:
        with self._lock:
            owner = self._owners.get(str(Path(path).resolve()))
        return owner is None or (client is not None and secrets.compare_digest(owner, client))


def client_of(request: Any) -> str | None:
    """The browser's cookie value from a `gr.Request` (None from API clients)."""
    try:
        header = request.headers.get("cookie")
    except Exception:  # noqa: BLE001 - no request: no owner
        return None
    return _parse(header) if header else None


def _parse(header: str) -> str | None:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 - a malformed header is no cookie
        return None
    return jar[COOKIE].value if COOKIE in jar else None


def _cookie(scope: dict) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            return _parse(value.decode("latin-1"))
    return None


class OwnedFiles:
    """ASGI middleware: sets the client cookie; refuses registered files to other clients."""

    def __init__(self, app: Any, owners: FileOwners) -> None:
        self.app = app
        self.owners = owners

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = _cookie(scope)
        path = unquote(scope.get("path", ""))
        if "/file=" in path and not self.owners.allowed(path.split("/file=", 1)[1], client):
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b'{"detail":"Not Found"}'})
            return
        new = None if client else secrets.token_urlsafe(24)

        async def send_with_cookie(message: dict) -> None:
            if new and message["type"] == "http.response.start":
                cookie = f"{COOKIE}={new}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)
