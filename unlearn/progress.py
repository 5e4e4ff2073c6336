"""Progress bars for the long loops outside training (generation, judging, evaluation, attacks).

They follow the training loop's rule (`unlearn.train.Trainer`): a tqdm bar on standard error, shown only when
standard error is a terminal and only by the first process of a machine, and removed when the loop ends, so
logs, pipes and notebooks, and the other processes of `accelerate launch`, stay free of bar debris.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def show_progress() -> bool:
    """Whether this process draws progress bars: standard error is a terminal and this is the local main
    process (accelerate's `LOCAL_RANK`, 0 or unset; read from the environment, so no process group is made)."""
    try:
        rank = int(os.environ.get("LOCAL_RANK") or 0)
    except ValueError:
        rank = 0
    return rank == 0 and sys.stderr.isatty()


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, unit: str = "it"):
    """`iterable` wrapped in a tqdm bar named `desc` (or a bar to `update` by hand when `iterable` is None),
    disabled where `show_progress()` says so."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=not show_progress())
