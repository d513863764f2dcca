"""Stop requests: SIGTERM (schedulers, preemption), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
--signal warning) only set a flag; the loop checks it at the next step boundary, saves a
checkpoint there and exits. Nothing is saved inside the handler, where the state may be
half-updated."""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequests:
    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: stop now, do not save
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def ignore_launcher_stop() -> None:
    """For a rank that has saved its checkpoint and is on its way out: once one rank exits,
    torchrun stops the others with SIGTERM, which would cut their exit short (rank 0 has still
    to say where the checkpoint is, and would exit -15 instead of 75)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
