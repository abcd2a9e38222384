"""Where a session's files live and when they go.

Every browser session gets a folder ``<root>/<random>/`` (the root is private: mode 0700, never
in Gradio's ``allowed_paths``, so nothing in it is served). Uploads are moved out of Gradio's
upload folder into it as soon as they arrive; exports are written into it under names with 128
random bits and handed to Gradio, which serves a copy from its cache under a path derived from a
secret seed and the content, to the browser that asked for it only (`app.serving`). When the
session ends (tab closed: ``demo.unload``; state expired:
``gr.State(delete_callback=...)``) the folder and Gradio's copies of its exports are removed;
at start-up, folders older than ``max_age_s`` left by a previous run are removed too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from app.serving import FileOwners

log = logging.getLogger(__name__)

#: Random bytes in an export's name (128 bits) and in a session folder's name (192 bits).
EXPORT_TOKEN_BYTES = 16
SESSION_TOKEN_BYTES = 24
_SESSION_NAME = re.compile(r"[A-Za-z0-9_-]{32}")  # secrets.token_urlsafe(SESSION_TOKEN_BYTES)
MARKER = ".rsvlm-app-files"


class SessionFiles:
    """One session's folder: adopted uploads and exports."""

    def __init__(self, folder: Path, owners: FileOwners | None = None) -> None:
        self.folder = folder
        self.owners = owners if owners is not None else FileOwners()
        self._served: list[Path] = []  # Gradio's cached copies of our exports

    def _ensure(self) -> Path:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.folder

    def adopt(self, path: str | Path) -> Path:
        """Move an upload out of Gradio's upload folder into this session's folder (files from
        anywhere else, e.g. a test's, are used where they are)."""
        src = Path(path)
        if not in_upload_folder(src):
            return src
        dest = self._ensure() / secrets.token_urlsafe(8) / src.name
        dest.parent.mkdir(mode=0o700)
        with LEASES.lease(src):  # the same content uploaded twice at once is one Gradio file
            try:
                os.link(src, dest)
            except OSError:
                if not src.exists():
                    raise
                shutil.copyfile(src, dest)
        return dest

    def export_path(self, stem: str, suffix: str) -> Path:
        return self._ensure() / f"{stem}-{secrets.token_urlsafe(EXPORT_TOKEN_BYTES)}{suffix}"

    def served(self, path: Path, client: str | None = None) -> None:
        """Remember where Gradio will serve ``path`` from (its cache copy), to remove it later,
        and serve it only to ``client`` (the browser's cookie; see `app.serving`)."""
        cached = gradio_cache_path(path)
        if cached is not None:
            self._served.append(cached)
            self.owners.register(cached, client)

    def close(self) -> None:
        for cached in self._served:
            shutil.rmtree(cached.parent, ignore_errors=True)
            self.owners.forget(cached)
        self._served.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def upload_folder() -> Path:
    """Gradio's upload (and cache) folder, as `gradio.utils.get_upload_folder` finds it."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def in_upload_folder(path: str | Path) -> bool:
    try:
        Path(path).resolve().relative_to(upload_folder().resolve())
    except ValueError:
        return False
    return True


class UploadLeases:
    """Gradio stores an upload at ``<upload folder>/<hash of content>/<name>``: two clients that
    upload the same bytes at once share one file. Handlers lease it while they use it; the last
    to finish leaves it for `GRACE_S` seconds (a call racing in just behind still finds it) and
    then it is deleted, with its hash folder."""

    GRACE_S = 60.0

    def __init__(self) -> None:
        self._count: dict[Path, int] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lease(self, path: str | Path | None):
        p = Path(path) if path and in_upload_folder(path) else None
        if p is not None:
            with self._lock:
                self._count[p] = self._count.get(p, 0) + 1
        try:
            yield
        finally:
            if p is not None:
                with self._lock:
                    self._count[p] -= 1
                timer = threading.Timer(self.GRACE_S, self._drop, args=(p,))
                timer.daemon = True
                timer.start()

    def _drop(self, path: Path) -> None:
        with self._lock:
            if self._count.get(path, 0) > 0:
                return
            self._count.pop(path, None)
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()


LEASES = UploadLeases()


def gradio_cache_path(path: Path) -> Path | None:
    """The path of Gradio's cache copy of an output file (``<cache>/<hash>/<name>``)."""
    try:
        from gradio import processing_utils, utils

        return Path(utils.get_upload_folder()) / processing_utils.hash_file(path) / path.name
    except Exception:  # noqa: BLE001 - best effort: Gradio's own delete_cache still runs
        return None


class FileStore:
    """All sessions' folders under one private root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        marker = self.root / MARKER
        if not self.root.exists() or marker.exists():
            # Ours: private. A folder that was there before (say --files-dir /tmp) keeps its
            # mode, and `sweep` only ever touches folders named like ours.
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            marker.touch()
        self._sessions: dict[str, SessionFiles] = {}
        self._lock = threading.Lock()
        self.owners = FileOwners()

    def open(self, key: str | None = None) -> SessionFiles:
        """The folder of session ``key`` (created on first use); a fresh one without a key."""
        with self._lock:
            if key is not None and key in self._sessions:
                return self._sessions[key]
            files = SessionFiles(self.root / secrets.token_urlsafe(SESSION_TOKEN_BYTES),
                                 self.owners)
            if key is not None:
                self._sessions[key] = files
            return files

    def close(self, key: str) -> None:
        with self._lock:
            files = self._sessions.pop(key, None)
        if files is not None:
            files.close()

    def close_all(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for files in sessions:
            files.close()

    def sweep(self, max_age_s: float) -> int:
        """Remove session folders not modified for ``max_age_s`` (left by earlier runs)."""
        cutoff, removed = time.time() - max_age_s, 0
        for entry in self.root.iterdir():
            if not _SESSION_NAME.fullmatch(entry.name):
                continue  # not a session folder of ours
            try:
                if entry.is_dir() and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("removed %d session folder(s) older than %.0f h", removed, max_age_s / 3600)
        return removed
