"""A run folder is the truth about one run.

It records the resolved recipe (`recipe.yaml`) and, in `run.json`, the recipe's and the input checkpoint's
fingerprints and the time of every segment of the run (a killed and resumed run has several). A rerun into the
same folder resumes an interrupted run or reuses a finished one only when both fingerprints match, and is
refused in one sentence otherwise; a lock refuses a second writer while a run is going on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import yaml

from .checkpoints import write_json, write_text
from .errors import ConfigError

_HASHES: dict = {}  # (path, size, mtime) -> sha256: a bench hashes the same checkpoint once per process


def checkpoint_fingerprint(checkpoint: str | None) -> str:
    """sha256 of the input checkpoint's files (a file, or every file of a folder, by relative path); a hub id, a
    world (built deterministically by this toolkit) or no checkpoint (fresh weights) stands for itself."""
    if not checkpoint:
        return "fresh weights"
    if str(checkpoint).startswith("world:"):
        return str(checkpoint)
    path = Path(checkpoint)
    if not path.exists():
        return f"hub id {checkpoint}"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _HASHES:
            file_hash = hashlib.sha256()
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    file_hash.update(chunk)
            _HASHES[key] = file_hash.hexdigest()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{_HASHES[key]}\0".encode())
    return digest.hexdigest()


def recipe_fingerprint(resolved: dict) -> str:
    """sha256 of the resolved recipe, without `output` (where the run is written is not what it does)."""
    settings = {k: v for k, v in resolved.items() if k != "output"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class RunFolder:
    """Open a run folder for one recipe: `with RunFolder(path, recipe) as folder:` (or `open()` / `close()`).

    On opening (main process) it takes the folder's lock, then: a new folder gets `recipe.yaml` and `run.json`;
    a folder of the same recipe and input checkpoint is resumed (`folder.resuming`) or, when finished, reused
    (`folder.complete`, `folder.metrics()`); anything else is refused with a `ConfigError`. Other processes of
    a multi-process launch only read.
    """

    def __init__(self, path: str | Path, recipe, main: bool = True):
        self.path = Path(path)
        self.recipe = recipe
        self.main = main
        self.complete = False
        self.resuming = False
        self._lock = None

    # ----------------------------------------------------------------------------------------------- opening

    def open(self) -> None:
        """Take the lock (main process), then check or start the folder; refuses in one sentence."""
        if self.main:
            self._take_lock()
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)  # still held: no other run has it
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def __enter__(self) -> RunFolder:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_lock(self) -> None:
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a+")  # noqa: SIM115 (held for the run, released in _release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"another run ({holder}) is writing to {str(self.path)!r}; wait for it to finish or choose "
                "another -o"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def _check(self) -> None:
        record = self.path / "run.json"
        resolved = self.recipe.to_dict()
        fingerprint = recipe_fingerprint(resolved)
        checkpoint = checkpoint_fingerprint(self.recipe.model.checkpoint)
        if record.exists():
            self.record = json.loads(record.read_text())
            same = self.record.get("recipe") == fingerprint and self.record.get("checkpoint") == checkpoint
            if same or self.record.get("segments"):
                self._check_same(fingerprint, checkpoint, resolved)
                return
            # a run that stopped before unlearning began (a bad input, say): another recipe may start over
        else:
            ours = {"recipe.yaml", "run.log", "reference"}  # what a run writes before run.json: nothing
            leftovers = (
                [p.name for p in self.path.glob("[!.]*") if p.name not in ours] if self.path.exists() else []
            )
            if leftovers:
                raise ConfigError(
                    f"{str(self.path)!r} is not empty and holds no run.json (it is not a run folder of this "
                    f"version: {', '.join(sorted(leftovers)[:3])}); choose another -o"
                )
        self.record = {"recipe": fingerprint, "checkpoint": checkpoint, "segments": [], "complete": False}
        if self.main:
            write_text(yaml.safe_dump(resolved, sort_keys=False), self.path / "recipe.yaml")
            write_json(self.record, record)

    def _check_same(self, fingerprint: str, checkpoint: str, resolved: dict) -> None:
        if self.record.get("recipe") != fingerprint:
            raise ConfigError(
                f"{str(self.path)!r} holds a run of another recipe ({self._difference(resolved)}); rerun it with "
                "its own recipe.yaml, or choose another -o"
            )
        if self.record.get("checkpoint") != checkpoint:
            raise ConfigError(
                f"{str(self.path)!r} holds a run of another input checkpoint (the file(s) of "
                f"{self.recipe.model.checkpoint!r} changed since it began); choose another -o"
            )
        self.complete = bool(self.record.get("complete")) and (self.path / "metrics.json").exists()
        self.resuming = not self.complete

    def _difference(self, resolved: dict) -> str:
        """The first setting that differs between the folder's recipe.yaml and this recipe."""
        try:
            stored = yaml.safe_load((self.path / "recipe.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return "its recipe.yaml is unreadable"
        for section, values in resolved.items():
            if section == "output":
                continue
            old = stored.get(section)
            if isinstance(values, dict) and isinstance(old, dict):
                for key in sorted(set(values) | set(old)):
                    if values.get(key) != old.get(key):
                        return f"{section}.{key}: {old.get(key)!r} there, {values.get(key)!r} here"
            elif values != old:
                return f"{section}: {old!r} there, {values!r} here"
        return "its fingerprint differs"

    # ----------------------------------------------------------------------------------------------- running

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def begin_segment(self) -> float:
        """Note that the unlearning call starts (again); returns the seconds the earlier, interrupted segments
        ran up to their last training checkpoint (work after it is done again, so it is not counted)."""
        segments = self.record["segments"]
        if segments and segments[-1].get("seconds") is None:
            started = segments[-1]["started"]
            saved = [p.stat().st_mtime for p in (self.path / "checkpoints").rglob("*") if p.is_file()]
            saved = [t for t in saved if t >= started]
            segments[-1]["seconds"] = max(saved) - started if saved else 0.0
        earlier = sum(s["seconds"] for s in segments)
        segments.append({"started": time.time(), "seconds": None})
        if self.main:
            write_json(self.record, self.path / "run.json")
        return earlier

    def finish(self, seconds: float) -> None:
        """The run is complete: its last segment ran `seconds`, and metrics.json is written."""
        self.record["segments"][-1]["seconds"] = seconds
        self.record["complete"] = True
        if self.main:
            write_json(self.record, self.path / "run.json")


def reference_folder(recipe, run_dir: Path) -> tuple[Path | None, dict | None]:
    """The Retrain run a finished run was compared with, and its metrics: `run_dir/reference`, or the run's
    `eval.reference` folder; (None, None) when it has neither."""
    candidates = [Path(run_dir) / "reference"]
    if recipe.eval.reference:
        candidates.append(Path(recipe.eval.reference))
    for folder in candidates:
        if (folder / "metrics.json").exists():
            return folder, json.loads((folder / "metrics.json").read_text())
    return None, None
