"""Fault-injection points for the chaos suite (tests/chaos).

`STACKML_CHAOS_PAUSE="<step>:<seconds>[,<step>:<seconds>...]"` in a worker's environment makes
that step sleep when it starts, so that a test can kill the worker while a job is inside the
phase. Unset (always, outside the chaos suite) it costs one environment lookup.
"""

from __future__ import annotations

import os
import time


def pause(step: str) -> None:
    spec = os.environ.get("STACKML_CHAOS_PAUSE")
    if not spec:
        return
    for item in spec.split(","):
        name, _, seconds = item.partition(":")
        if name.strip() == step:
            time.sleep(float(seconds or "0"))
