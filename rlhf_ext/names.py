"""Model and dataset names as the Hub sees them: a Hub id, or a local path that must never be published.

Pure string and path logic (no `datasets`, no TRL), so the models layer and the GPU check can import it.
"""

from __future__ import annotations

import os
from pathlib import Path


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether `name_or_path` can only be a local path, not a Hub id ("name" or "org/name").

    Absolute, home-relative (~), explicitly relative (./, ../) and Windows paths, paths with more than one "/",
    and "dir/name" where `dir` is an existing local folder.
    """
    if os.path.isabs(name_or_path) or name_or_path.startswith(("~", "./", "../", ".\\")) or "\\" in name_or_path:
        return True
    parts = name_or_path.strip("/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it is a Hub id ("name" or "org/name" that is not a local path), else None."""
    if not name_or_path or looks_like_local_path(name_or_path) or os.path.exists(name_or_path):
        return None
    return name_or_path


def public_name(name_or_path: str | None) -> str | None:
    """A Hub id as it is; a local path as its last component (never the machine's path)."""
    if not name_or_path:
        return None
    return name_or_path if hub_id(name_or_path) else Path(name_or_path.rstrip("/\\")).name
