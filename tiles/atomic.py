"""Write a file or folder under a temporary name and rename it into place when it is complete.

Readers (another process, a crashed run's next start) then see the old content or the new, never
half of either: exports, downloaded tiles, converted weights, ONNX decoders, datasets and
feature caches are all written this way. It lives in `tiles` because every other package may
import `tiles` and `tiles` imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, folder: bool = False, replace: bool = True
) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed to ``path``.

    A file's temporary name does not exist yet (some writers, GDAL among them, refuse to write
    over a file) and keeps ``path``'s suffix (writers that pick a format by it still do); a
    ``folder`` is created empty. With ``replace`` an existing ``path`` is replaced; without, an
    existing one is kept and the new copy dropped (another process finished the same work
    first). On an error the temporary copy is removed and the error raised.
    """
    path = Path(path)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()
    try:
        yield tmp
        if path.exists() and not replace:
            return
        if folder and path.exists():
            shutil.rmtree(path)
        # Without replace, another process that finished first wins the rename race.
        with contextlib.nullcontext() if replace else contextlib.suppress(OSError):
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


__all__ = ["atomic_path"]
