"""Start-up of the commands that compute: torch imported with the cyclic garbage collector
paused, and what the import made frozen out of later collections (issue 15: start-up)."""

from __future__ import annotations

import gc
import sys

__all__ = ["load_torch_quietly"]


def load_torch_quietly() -> None:
    """Import torch unless it is loaded already (then nothing changes).

    Importing torch makes ~250k long-lived objects; with the collector on, each full collection
    the import triggers scans all of them again (~0.4 s of its ~1.5 s), and so does the one at
    interpreter exit. Paused during the import and frozen after it (`gc.freeze`: moved to the
    permanent generation, never scanned), the import costs only its own work. Objects made
    later are collected as usual; the import's own cyclic garbage stays (a one-off, small).
    """
    if "torch" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
