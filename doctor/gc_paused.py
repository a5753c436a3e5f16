"""Pause Python's cycle collector while a reader builds a very large index.

A 300,000-tensor header or state dict becomes millions of small containers, none of them in a
reference cycle. The collector's passes over them find nothing to free and take most of the time.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
