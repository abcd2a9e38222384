"""Login for `rsvlm-app`: credentials from a file or the environment (never needed on the command
line, where `ps` shows them to every user of the machine), checked by an async Gradio auth
function that slows down repeated failures.

Throttle: each failed login for a user name doubles the wait before that name's next attempt
is checked (0.5 s, 1 s, 2 s ... up to `MAX_DELAY_S`), attempts for one name are checked one at a
time, and unknown names share one counter, so guessing costs time whatever the parallelism. The
wait is an ``asyncio.sleep`` on Gradio's event loop, which ties up no worker thread; at most
`MAX_WAITING` logins wait at once, and beyond that logins are refused at once without being
checked (a flood of logins cannot queue up without bound, nor skip the wait).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENV_VAR = "RSVLM_APP_AUTH"
BASE_DELAY_S = 0.5
MAX_DELAY_S = 10.0
MAX_WAITING = 32
_UNKNOWN = "\0unknown user"


def parse_credentials(text: str, where: str) -> dict[str, str]:
    """``user:password`` per line (``#`` comments and blank lines skipped)."""
    creds: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise SystemExit(f"{where}, line {n}: expected USER:PASSWORD")
        creds[user.strip()] = password
    if not creds:
        raise SystemExit(f"{where}: no USER:PASSWORD line")
    return creds


def load_credentials(auth_file: str | None, auth_arg: str | None,
                     environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """Credentials from ``--auth-file``, else ``$RSVLM_APP_AUTH``, else ``--auth`` (with a
    warning: the command line is visible to every local user); None means no login."""
    env = os.environ if environ is None else environ
    if auth_file:
        path = Path(auth_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SystemExit(f"--auth-file: cannot read {auth_file}: {exc.strerror}") from exc
        if path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("%s is readable by other users; `chmod 600 %s`", auth_file, auth_file)
        return parse_credentials(text, "--auth-file")
    if env.get(ENV_VAR):
        return parse_credentials(env[ENV_VAR], f"${ENV_VAR}")
    if auth_arg:
        log.warning("--auth puts the password on the command line, where `ps` shows it to every "
                    "user of this machine; use --auth-file FILE or $%s instead", ENV_VAR)
        return parse_credentials(auth_arg, "--auth")
    return None


def throttled_auth(credentials: dict[str, str], *, base_delay_s: float = BASE_DELAY_S,
                   max_delay_s: float = MAX_DELAY_S, max_waiting: int = MAX_WAITING
                   ) -> Callable[[str, str], Awaitable[bool]]:
    """A Gradio ``auth`` function (it must be a coroutine function: Gradio awaits it on the event
    loop) that checks ``credentials`` with a growing delay after failures."""
    fails: dict[str, int] = {}
    locks: dict[str, asyncio.Lock] = {}
    waiting = 0

    async def auth(username: str, password: str) -> bool:
        nonlocal waiting
        if waiting >= max_waiting:
            log.warning("login refused unchecked: %d logins already waiting", waiting)
            return False
        key = username if username in credentials else _UNKNOWN
        waiting += 1
        try:
            async with locks.setdefault(key, asyncio.Lock()):
                n = fails.get(key, 0)
                if n:
                    await asyncio.sleep(min(max_delay_s, base_delay_s * 2 ** (n - 1)))
                expected = credentials.get(username, "")
                ok = key != _UNKNOWN and hmac.compare_digest(password.encode(), expected.encode())
                if ok:
                    fails.pop(key, None)
                else:
                    fails[key] = n + 1
                    log.warning("failed login (%s), %d in a row",
                                "unknown user" if key == _UNKNOWN else "known user", n + 1)
                return ok
        finally:
            waiting -= 1

    return auth
