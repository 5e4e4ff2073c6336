"""Where the worlds' models are cached."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "UNLEARN_CACHE"


def cache_dir() -> Path:
    """Where worlds are cached: `$UNLEARN_CACHE`, else `~/.cache/unlearn-toolkit`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "unlearn-toolkit")
