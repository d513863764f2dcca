"""Talking to the Hugging Face hub only when it can answer.

Without a network, `transformers` and `datasets` retry for a minute or more before failing.
ptft probes the hub once (a TCP connect with a short timeout); when it is unreachable, the HF
libraries are put in offline mode, so a copy in the local HF cache still loads and a missing
one fails at once with a message that says what to do instead.
"""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def prepare_for_hub() -> bool:
    """Call before loading anything by hub name. Returns True when the hub is reachable;
    otherwise switches the HF libraries to offline mode (cache only) and returns False."""
    # Read as huggingface_hub reads it: 1/ON/YES/TRUE in any case; anything else is online.
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    if hub_reachable():
        return True
    os.environ["HF_HUB_OFFLINE"] = "1"
    # Libraries imported before this point read the variable at import time: update them too.
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants
        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config
        datasets.config.HF_HUB_OFFLINE = True
    return False


def offline_hint() -> str:
    return (f"The hub ({hub_endpoint()}) cannot be reached from this machine and no copy is in "
            "the local Hugging Face cache.")
