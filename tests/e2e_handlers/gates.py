"""Gates: a handler that waits at a gate file holds its step until the test creates the file.

A test thereby decides when a step may end -- "running" lasts as long as it needs, however
slow or fast the machine is -- without guessing at timings. Not a handler module: importing
it registers nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

from duplex import PermanentError, StepContext

# A gate never holds a step for longer than this, so a test that forgot one cannot hang.
GATE_LIMIT_S = 60.0


def wait_at_gate(ctx: StepContext, gate: str | Path) -> None:
    """Return once the file ``gate`` exists, or the step is cancelled (its timeout)."""
    path = Path(gate)
    deadline = time.monotonic() + GATE_LIMIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise PermanentError(f"gate {path} was never opened")
        if ctx.cancelled.wait(0.02):
            return
