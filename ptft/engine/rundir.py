"""The run directory: created once, never shared by two runs by accident."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ptft.errors import UsageError


def check_run_name(name: str) -> str:
    """A run name is one plain path component: it cannot point outside run.root."""
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise UsageError(f"run.name={name!r} must be a plain name (letters, digits, '-', '_'), "
                         "without '/', '..' or a leading '.'; use run.dir for a path.")
    return name


def create_run_dir(explicit: str | None, root: str, stage: str,
                   name: str | None = None) -> tuple[Path, bool]:
    """`explicit` (run.dir) if given, else a new <root>/<stage>/<timestamp>[-N] folder; and
    whether this call created it (so a run that fails while starting can remove it again).

    Fails early, before any work, when the location is not writable."""
    if name and not explicit:
        explicit = str(Path(root).expanduser() / stage / check_run_name(name))
    if explicit:
        path = Path(explicit).expanduser()
        new = not path.exists()  # a folder the user made (even empty) is never removed
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create run.dir={explicit}: {err.strerror}.") from None
    else:
        parent = Path(root).expanduser() / stage
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create {parent}: {err.strerror}; set run.root or run.dir "
                             "to a writable place.") from None
        new = True
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1000):  # two runs started in the same second get -1, -2, ...
            path = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
    if not os.access(path, os.W_OK):
        raise UsageError(f"the run directory {path} is not writable; choose another run.dir.")
    return path, new
