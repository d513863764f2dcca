"""Folders written under a temporary name and renamed into place when complete."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temporary_sibling(final: Path) -> Path:
    """A new, empty, hidden folder next to `final`, to be renamed to it when complete. With
    the mode of any folder made there (umask applied): tempfile makes it private (0700), and
    the rename would keep that, so others sharing the file system (a cache, a merged model)
    could not read it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp
