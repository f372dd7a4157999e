"""Where a spec may point, and how its files are read: inside the repository, regular files, under a size cap.

The repository root is the working directory (make, DVC and every stage run there). A folder outside it is allowed
only when the user lists it in the environment variable FLOWOPD_DATA_ROOTS (absolute folders separated by `:`),
never by a spec. Paths a spec names (`extends`, prompt files, model and scorer folders) are checked twice: by
validation, on the text (relative without `..`, or absolute inside an allowed root), and before a file is read, on
the real path (symbolic links followed), its type and its size, so `/dev/zero` or a fifo is never opened for reading.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

DATA_ROOTS_ENV = "FLOWOPD_DATA_ROOTS"
SPEC_FILE_MAX_BYTES = 1 << 20  # the shipped specs are under 10 KB
PROMPT_FILE_MAX_BYTES = 256 << 20  # Flow-GRPO's largest prompt set is a few MB


class PathRefused(ValueError):
    """A path outside the allowed roots, not a regular file, or too large; the message names the rule only."""


def allowed_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """The repository root (`root`, default the working directory) and the folders of FLOWOPD_DATA_ROOTS."""
    listed = [p for p in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(os.path.realpath(p)) for p in (root or os.getcwd(), *listed)]


def inside(path: str | os.PathLike, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(r) for r in roots)


def check_spec_path(value: str) -> str:
    """Pydantic validator of a path field: relative without `..` (inside the repository whatever it is), or
    absolute inside an allowed root. A hub id (`org/name`) has the shape of a relative path and passes."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("a path has no control characters")
    path = PurePosixPath(value)
    if path.is_absolute() or value.startswith("~"):
        if not inside(os.path.expanduser(value), allowed_roots()):
            raise ValueError(f"an absolute path must lie inside the repository or a folder of {DATA_ROOTS_ENV}")
    elif ".." in path.parts:
        raise ValueError(f"must stay inside the repository (no '..'; folders elsewhere: {DATA_ROOTS_ENV})")
    return value


def read_confined(path: str | os.PathLike, max_bytes: int, roots: list[Path] | None = None) -> bytes:
    """The bytes of a regular file of at most max_bytes, inside `roots` when given; PathRefused otherwise
    (FileNotFoundError when it does not exist). The cap is checked before reading and again while reading."""
    if roots is not None and not inside(path, roots):
        raise PathRefused(f"outside the repository (folders elsewhere need {DATA_ROOTS_ENV})")
    with open(path, "rb", opener=_open_without_blocking) as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused("not a regular file")
        if info.st_size > max_bytes:
            raise PathRefused(f"larger than {max_bytes} bytes")
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PathRefused(f"larger than {max_bytes} bytes")
    return data


def _open_without_blocking(path, flags):
    """Opening a fifo for reading waits for a writer; O_NONBLOCK returns at once, and fstat then refuses it."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))
