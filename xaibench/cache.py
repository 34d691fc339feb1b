"""Where xaibench keeps generated data and trained weights, and how it writes them safely."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """The cache root, created on demand.

    ``$XAIBENCH_CACHE`` if set, else ``$XDG_CACHE_HOME/xaibench``, else ``~/.cache/xaibench``.
    """
    if env := os.environ.get("XAIBENCH_CACHE"):
        root = Path(env)
    elif xdg := os.environ.get("XDG_CACHE_HOME"):
        root = Path(xdg) / "xaibench"
    else:
        root = Path.home() / ".cache" / "xaibench"
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    An interrupted write therefore never leaves a partial file at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
