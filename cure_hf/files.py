"""Small file helpers. Files cure_hf writes get the permissions ``open()`` would give them: ``0o666 & ~umask``
(folders ``0o777``); :func:`read_json` reads the JSON files of saved folders and checkpoints.

safetensors' ``save_file`` (and so transformers' ``save_pretrained``) creates its files ``0o600`` whatever the
umask, so a checkpoint on a shared file system could not be read by colleagues or a serving process.
:func:`chmod_as_umask` is called on every such file once it is written.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Dict, Optional

__all__ = ["current_umask", "chmod_as_umask", "read_json"]

_REQUIRED = object()


def read_json(path: str, default: Any = _REQUIRED) -> Dict[str, Any]:
    """The JSON object in ``path``; with ``default``, that instead of an error for a missing or unreadable file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        if default is _REQUIRED:
            raise
        return default


_umask_lock = threading.Lock()


def _proc_umask() -> Optional[int]:
    """The umask from ``/proc/self/status`` (Linux 4.7+), read without changing it; None where unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_umask() -> int:
    """The process's umask. Elsewhere than Linux it is read by setting and restoring it (``os.umask`` has no
    read-only form): process-wide, for an instant, so a file another thread creates in that instant is ``0o077``
    masked at worst (never more open than asked)."""
    found = _proc_umask()
    if found is not None:
        return found
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def chmod_as_umask(path: str) -> None:
    """Give ``path`` (a file, or a folder) the permissions ``open()`` / ``os.makedirs`` would: ``0o666 & ~umask``
    (``0o777`` for a folder). A file system that cannot change modes (some network mounts, Windows) is left alone."""
    try:
        full = 0o777 if os.path.isdir(path) else 0o666
        os.chmod(path, full & ~current_umask())
    except (OSError, NotImplementedError):
        pass
