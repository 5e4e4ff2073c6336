"""Paths a run writes to or reads from, checked before use: every reason one cannot be used (a file or a symlink
loop in the way, a name too long, a read-only or full file system, a link out of the folder) said in one sentence.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import CheckpointNotFoundError, ConfigError, OutputError, UnlearnError


def shown(path: str | Path, limit: int = 160) -> str:
    """`path` quoted for a one-line message; a path too long to read is cut in its middle (its byte length is
    given instead)."""
    text = str(path)
    if len(text) <= limit:
        return repr(text)
    return (
        repr(f"{text[: limit // 2]}…{text[-limit // 4 :]}")
        + f" ({len(text.encode('utf-8', 'surrogatepass'))} bytes)"
    )


def _blocker(path: Path) -> str | None:
    """Why `path` cannot be a folder because of what is already at it or above it (a file, a dangling symlink,
    a symlink loop), named; None when nothing is in the way."""
    here = Path(path.anchor) if path.is_absolute() else Path()
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return None  # from here on it can be created
        except OSError:
            return None  # a name too long, no permission: the error itself says it
        if stat.S_ISLNK(mode):
            try:
                mode = os.stat(here).st_mode
            except FileNotFoundError:
                return f"{shown(here)} is a symlink to {shown(os.readlink(here))}, which does not exist"
            except OSError as err:
                if err.errno == errno.ELOOP:
                    return f"{shown(here)} is a symlink loop"
                return None
        if not stat.S_ISDIR(mode):
            what = "a file" if stat.S_ISREG(mode) else "a special file"
            if here == path:
                return f"{shown(here)} is {what}, not a folder"
            return f"{shown(here)} is {what}, so {shown(path)} cannot be a folder"
    return None


def output_error(path: str | Path, err: OSError, fix: str = "choose another -o") -> UnlearnError:
    """The one-sentence error for an output path that cannot be written (`err` from creating or opening it)."""
    path = Path(path)
    named = err.filename2 or err.filename  # a rename's destination is the file the user knows
    name = Path(os.fsdecode(named)) if named else path
    code = err.errno
    if code in (errno.EEXIST, errno.ENOTDIR, errno.ELOOP):
        reason = _blocker(path) or _blocker(name)
        if reason:
            return OutputError(f"{reason}; {fix}")
    if code == errno.ENAMETOOLONG:
        return OutputError(
            f"the output path {shown(name)} is too long (a name over 255 bytes or a path over 4096 bytes); choose "
            "a shorter -o"
        )
    if code == errno.EROFS:
        return OutputError(f"cannot write {shown(name)}: it is on a read-only file system; {fix}")
    if code in (errno.EACCES, errno.EPERM):
        return OutputError(
            f"cannot write {shown(name)}: permission denied (a read-only or immutable folder); {fix}"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(
            f"cannot write {shown(name)}: no space left on its device; free some space or {fix}"
        )
    if code == errno.EISDIR:
        return OutputError(f"{shown(name)} is a folder where the run writes a file; remove it or {fix}")
    return OutputError(f"cannot write {shown(name)} ({err.strerror or err}); {fix}")


def make_folder(path: str | Path, fix: str = "choose another -o") -> Path:
    """Create the output folder `path` (and its parents), or say in one sentence why it cannot be: a file, a
    dangling symlink or a symlink loop in the way, a name too long, a read-only or immutable folder, a full disk.

    Raises:
        OutputError: it cannot be created.
    """
    path = Path(path)
    reason = _blocker(path)
    if reason:
        raise OutputError(f"{reason}; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(path, err, fix) from None
    return path


def open_own_file(path: str | Path, flags: int, fix: str = "choose another -o") -> int:
    """Open (creating) the file `path` of an output folder, refusing to follow a symlink out of the folder or to
    open a folder, a FIFO or a device put in its place; returns the file descriptor.

    Raises:
        OutputError: it is a symlink or not a regular file, or it cannot be opened for writing.
    """
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP and path.is_symlink():
            raise OutputError(
                f"{shown(path)} is a symlink; a run writes only its own files, never through a link: remove it "
                f"or {fix}"
            ) from None
        raise output_error(path, err, fix) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{shown(path)} is not a regular file (a FIFO or a device?); remove it or {fix}")
    os.set_blocking(fd, True)
    return fd


def existing_path(path: str | Path, what: str = "run folder") -> Path:
    """`path` of something to read (the run folder of `unlearn eval` or `unlearn attack`), checked with one
    stat before anything opens it: nothing there, a dangling symlink, a symlink loop or a name too long is said
    in one sentence.

    Raises:
        CheckpointNotFoundError: nothing is there (or a symlink points nowhere).
        ConfigError: it cannot be reached (a symlink loop, a name too long, a file above it, no permission).
    """
    path = Path(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        reason = _blocker(path)
        raise CheckpointNotFoundError(
            f"{reason or f'{what} {shown(path)} does not exist'}; give an existing {what}"
        ) from None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            reason = (
                f"{what} {shown(path)} is too long a path (a name over 255 bytes or a path over 4096 bytes)"
            )
        else:
            reason = _blocker(path) or f"{what} {shown(path)} cannot be reached ({err.strerror or err})"
        raise ConfigError(f"{reason}; give an existing {what}") from None
    return path
