"""Spec problems, one line each: `file.yaml: dotted.field.path: message` (or `file.yaml:LINE:COL: message`)."""

from __future__ import annotations

import os


class SpecError(Exception):
    """One or more problems with a spec, each a one-line string `file: dotted.path: message`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def dotted(loc) -> str:
    """('opd', 'sampler', 'steps') -> 'opd.sampler.steps'."""
    return ".".join(str(part) for part in loc)


def display_path(path: str | os.PathLike) -> str:
    """Path as shown in messages: relative to the working directory when inside it."""
    path = os.path.normpath(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel
