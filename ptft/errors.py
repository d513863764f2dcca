"""Errors a user can cause and fix: the CLI prints their message (no traceback) and exits 2."""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Iterable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# A run stopped by a signal (preemption, Ctrl-C) after saving a checkpoint. 75 is EX_TEMPFAIL
# of sysexits.h, "try again later": a batch script requeues on it.
EXIT_PREEMPTED = 75
# Stopped at once by a second Ctrl-C, without saving: the shell's code for SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad usage, config or input. The message names the thing and says how to fix it."""


@contextlib.contextmanager
def writing_to(path, option: str = "--output"):
    """Turn a failure to write the output the user named (no such folder, a file where a
    folder should be, no permission, a full disk) into a UsageError naming it."""
    try:
        yield
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}; choose another "
                         f"{option}.") from None


class Preempted(Exception):
    """The run saved a checkpoint and stopped on a signal; running it again resumes it."""


class TrainingFailed(Exception):
    """Training cannot go on (e.g. a non-finite loss); the message says why and what was kept."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name when it has none)."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def caused_by(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of type `kind` in err's chain of causes (libraries wrap them)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


_SECRET_KEY = re.compile(r"(_token|_key|password|secret)$|password", re.IGNORECASE)


def redact_secrets(tree):
    """A copy of a config tree with the values of secret-looking keys (*_token, *_key,
    *password*, *secret) replaced, for everything ptft writes or prints."""
    if isinstance(tree, dict):
        return {k: "***" if _SECRET_KEY.search(str(k)) and tree[k] is not None
                else redact_secrets(tree[k]) for k in tree}
    if isinstance(tree, list):
        return [redact_secrets(v) for v in tree]
    return tree
