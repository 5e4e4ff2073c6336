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

from .checkpoints import remove_temporaries, require_file, write_json, write_text
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, OutputError, UnlearnError
from .paths import existing_path, make_folder, open_own_file, output_error, shown

_HASHES: dict = {}  # (path, size, mtime) -> sha256: a bench hashes the same checkpoint once per process


def checkpoint_fingerprint(checkpoint: str | None) -> str:
    """sha256 of the input checkpoint's files (a file, or every file of a folder, by relative path, bar the
    folder's model card `README.md`: documentation, which `unlearn attack` rewrites in an output folder); a hub
    id, a world (built deterministically by this toolkit) or no checkpoint (fresh weights) stands for itself."""
    if not checkpoint:
        return "fresh weights"
    if str(checkpoint).startswith("world:"):
        return str(checkpoint)
    path = Path(checkpoint)
    if not path.exists():
        return f"hub id {checkpoint}"
    # a FIFO or a device is refused before it is opened (reading one blocks or never ends)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p != path / "README.md")
    else:
        files = [require_file(path)]
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


def take_lock(folder: Path, fix: str = "choose another -o") -> int | str:
    """Take the lock of the run folder `folder`: an flock on `folder/.lock` (opened never through a symlink,
    never a folder or a FIFO), holding this process's pid. Returns its file descriptor (closing it releases
    the lock), or, when another process holds it, that process's name ("pid 123").

    Raises:
        OutputError: the lock file cannot be opened or written.
    """
    import fcntl

    lock = folder / ".lock"
    fd = open_own_file(lock, os.O_RDWR, fix)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return holder
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
    except OSError as err:
        os.close(fd)
        raise output_error(lock, err, fix) from None
    return fd


# What a run writes into its folder before run.json: a folder holding nothing else (hidden files included, bar
# these and the temporary files of their atomic writes) may become a run folder.
_BEFORE_RECORD = ("recipe.yaml", "run.log", "reference", "run.json")


def foreign_entries(folder: Path) -> list[str]:
    """The entries of an existing `folder` without run.json that no run put there (hidden ones included: `-o ~`
    is refused even where the home folder holds only dotfiles)."""
    if not folder.is_dir() or (folder / "run.json").exists() or (folder / "run.json").is_symlink():
        return []

    def ours(name: str) -> bool:
        return name in (*_BEFORE_RECORD, ".lock", ".DS_Store") or any(
            name.startswith(f".{own}.") for own in _BEFORE_RECORD
        )

    return sorted(entry.name for entry in folder.iterdir() if not ours(entry.name))


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
        self.missing: list[str] = []
        self._lock = None

    # ----------------------------------------------------------------------------------------------- opening

    def open(self) -> None:
        """Take the lock (main process), then check or start the folder; refuses in one sentence (an output path
        that cannot be written: `OutputError`)."""
        try:
            if self.main:
                foreign = foreign_entries(self.path)
                if foreign:  # refused before anything is written into it (`-o .`, `-o ~`, `-o /`)
                    raise ConfigError(
                        f"{shown(self.path)} is not empty and holds no run.json (it is not a run folder of this "
                        f"version: {', '.join(foreign[:3])}); choose another -o"
                    )
                self._take_lock()
            try:
                if self.main:  # run.log is appended to, not replaced: refused before recipe.yaml and run.json
                    os.close(open_own_file(self.path / "run.log", os.O_WRONLY | os.O_APPEND))
                self._check()
            except BaseException:
                self.close()
                raise
        except OSError as err:
            if isinstance(err, UnlearnError) or not self._within(err.filename):
                raise
            raise output_error(self.path, err) from None

    def _within(self, filename) -> bool:
        """Whether an error's file is the run folder, in it or on the way to it (else it is an input's)."""
        if not filename:
            return True
        name = os.path.abspath(os.fsdecode(filename))
        folder = os.path.abspath(self.path)
        return name == folder or name.startswith(folder + os.sep) or folder.startswith(name + os.sep)

    def close(self) -> None:
        if self._lock is not None:
            try:  # still held: no other run has it; unlinked only if it is still our file
                if os.path.samestat(os.lstat(self.path / ".lock"), os.fstat(self._lock)):
                    os.unlink(self.path / ".lock")
            except OSError:
                pass  # gone already, or the folder went away
            os.close(self._lock)  # closing the file releases the flock
            self._lock = None

    def __enter__(self) -> RunFolder:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_lock(self) -> None:
        held = take_lock(make_folder(self.path))
        if isinstance(held, str):
            raise ConfigError(
                f"another run ({held}) is writing to {shown(self.path)}; wait for it to finish or choose "
                "another -o"
            )
        self._lock = held

    def _check(self) -> None:
        self.remove_temporaries()  # what killed atomic writes left (the lock is held: none is in use)
        record = self.path / "run.json"
        resolved = self.recipe.to_dict()
        fingerprint = recipe_fingerprint(resolved)
        checkpoint = checkpoint_fingerprint(self.recipe.model.checkpoint)
        if record.exists() or record.is_symlink():
            self.record = _read_record(record)
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
        # run.json says complete only after every output is written (`finish`, last); a folder that says so yet
        # misses one (removed by hand, an older version's order) is not reused: the run is done again.
        self.missing = [name for name in self._outputs() if not (self.path / name).exists()]
        self.complete = bool(self.record.get("complete")) and not self.missing
        if self.complete:  # a finished run is reused: its metrics must be whole
            self.metrics()
            if self.main:  # resume state a run killed right after finishing left behind
                import shutil

                shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
        elif self.record.get("complete"):  # its training checkpoints are gone: it runs again from the start
            self.record["complete"] = False
            self.record["segments"] = []
        self.resuming = not self.complete

    def _outputs(self) -> list[str]:
        """What a complete run folder holds: its recipe, model, metrics and report (and attacks.json when the
        recipe names attacks)."""
        names = ["recipe.yaml", "model", "metrics.json", "report.md"]
        attacks = getattr(getattr(self.recipe, "eval", None), "attacks", None)
        return names + ["attacks.json"] if attacks else names

    def remove_temporaries(self) -> None:
        """Remove the temporaries of atomic writes that a killed run left in the folder (main process, with the
        lock held: no other writer can be using them)."""
        if self.main and self._lock is not None and self.path.is_dir():
            remove_temporaries(self.path)

    def ensure_held(self) -> None:
        """Refuse to write on when the run folder was deleted or replaced while the run was going (its lock
        file is no longer the one this run holds): the run's earlier outputs are gone with it.

        Raises:
            OutputError: the folder is gone or another one is in its place.
        """
        if not self.main or self._lock is None:
            return
        try:
            held = os.path.samestat(os.lstat(self.path / ".lock"), os.fstat(self._lock))
        except OSError:
            held = False
        if not held:
            raise OutputError(
                f"the run folder {shown(self.path)} was deleted or replaced while this run was writing to it; "
                "remove what is left of it and rerun the same command"
            )

    def _difference(self, resolved: dict) -> str:
        """The first setting that differs between the folder's recipe.yaml and this recipe."""
        stored_file = self.path / "recipe.yaml"
        try:
            if not stored_file.is_file():  # a FIFO would block: only a regular file is read
                return "its recipe.yaml is missing or not a file"
            from .safe_yaml import read_yaml  # bounded: an alias bomb is refused, not expanded

            stored = read_yaml(stored_file, "recipe") or {}
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: bad UTF-8, ConfigError
            return "its recipe.yaml is unreadable"
        if not isinstance(stored, dict):
            return "its recipe.yaml is not a mapping"
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
        return read_metrics(self.path / "metrics.json", f"run folder {str(self.path)!r}")

    def begin_segment(self) -> float:
        """Note that the unlearning call starts (again); returns the seconds the earlier, interrupted segments
        ran up to their last training checkpoint (work after it is done again, so it is not counted)."""
        self.ensure_held()
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
        """The run is complete: its last segment ran `seconds`, and every output (`_outputs`) is written.
        Called last, after the final writes, so that a run killed before this point is resumed (its writes
        done again), never taken for finished; a folder recorded complete that misses an output is not reused
        either (`_check_same`).

        Raises:
            OutputError: the folder was deleted or replaced during the run (`ensure_held`).
        """
        self.ensure_held()
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
            return folder, read_metrics(folder / "metrics.json", f"reference run {str(folder)!r}")
    return None, None


def read_metrics(file: Path, what: str) -> dict:
    """A run folder's `metrics.json`: a JSON object of metric names to numbers (or strings: the device).

    Raises:
        CheckpointError: it is not a regular file, not JSON, or not such an object.
    """
    file = Path(file)
    require_file(file, f"{what}: metrics file")
    try:
        metrics = json.loads(file.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON, bad UTF-8
        raise CheckpointError(
            f"{str(file)!r} of {what} is corrupt ({(str(err).splitlines() or [type(err).__name__])[0]}); "
            "rerun that run into a fresh folder"
        ) from err
    if not isinstance(metrics, dict) or not all(
        isinstance(value, (int, float, str)) or value is None for value in metrics.values()
    ):
        raise CheckpointError(
            f"{str(file)!r} of {what} is not a mapping of metric names to numbers; it is corrupt, rerun that "
            "run into a fresh folder"
        )
    return metrics


def finished_run(path: str | Path, command: str) -> Path:
    """`path` as the finished run folder that `command` (`unlearn eval`, `unlearn attack`) reads: it exists, and
    its run.json says that every output was written.

    Raises:
        CheckpointNotFoundError: nothing is there, or it is not a run folder.
        ConfigError: it cannot be reached, or its run is unfinished or its run.json corrupt.
    """
    path = existing_path(path)
    if not path.is_dir() or not (path / "run.json").exists():
        raise CheckpointNotFoundError(
            f"{shown(path)} is not a run folder (no run.json in it); give {command} a folder `unlearn erase` wrote"
        )
    if not _read_record(path / "run.json")["complete"]:
        raise ConfigError(
            f"the run in {shown(path)} is unfinished (its run.json does not say complete: it was interrupted or "
            f"failed); rerun its `unlearn erase` command to finish it, then {command} it"
        )
    return path


def _read_record(file: Path) -> dict:
    """A run folder's `run.json` (fingerprints, segments, complete), every field checked."""
    folder = str(file.parent)

    def corrupt(reason: str) -> ConfigError:
        return ConfigError(
            f"{str(file)!r} is corrupt ({reason}), so {folder!r} cannot be resumed or reused; delete the folder "
            "to run again, or choose another -o"
        )

    require_file(file, "run record", ConfigError)
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise corrupt(str(err).splitlines()[0] if str(err) else type(err).__name__) from err
    if not isinstance(record, dict):
        raise corrupt(f"a JSON {type(record).__name__}, not an object")
    for key in ("recipe", "checkpoint"):
        if not isinstance(record.get(key), str):
            raise corrupt(f"{key} must be a fingerprint string, got {record.get(key)!r}")
    segments = record.get("segments")
    if not isinstance(segments, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("started"), (int, float))
        and (s.get("seconds") is None or isinstance(s.get("seconds"), (int, float)))
        for s in segments
    ):
        raise corrupt("segments must be a list of {started, seconds} records")
    if not isinstance(record.get("complete"), bool):
        raise corrupt(f"complete must be true or false, got {record.get('complete')!r}")
    return record
