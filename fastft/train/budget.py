"""--budget: how long choosing may take (the backbone: --arch a,b,c or auto; the strategy: --strategy auto's trial).

One deadline for the whole choice, set when the run is prepared: choosing the backbone spends it first, then the
trial's epochs. Out of time, the best candidate so far is kept (each chooser says how). A budget too small for the
first signal, the probe's pass over the training images (the cheapest measurement there is), is an error that
names the least that would do: running past the budget at once would be worse than saying so.
"""
from __future__ import annotations

import math
import re
import time
from typing import Callable, NamedTuple

from fastft.errors import UsageError


def seconds_of(text: str) -> float | None:
    """--budget as seconds: '90', '90s', '10m', '1.5h'; None for no budget."""
    if not text:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not found or float(found[1]) <= 0:
        raise UsageError(f"--budget '{text}' is not a time; give seconds, minutes or hours, e.g. 90s, 10m, 1h")
    return float(found[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[found[2]]


now = time.perf_counter  # the clock a run's budget reads (a test may give it one of its own)


class Budget(NamedTuple):
    text: str  # as the user gave it, for messages
    began: float  # on `clock`'s scale
    deadline: float
    clock: Callable[[], float]

    @classmethod
    def start(cls, text: str, clock: Callable[[], float] | None = None) -> "Budget | None":
        """The budget started now, on `clock` (default: `now`); None without --budget. A malformed one is a
        UsageError."""
        seconds = seconds_of(text)
        if seconds is None:
            return None
        clock = clock or now
        began = clock()
        return cls(text, began, began + seconds, clock)

    def would_pass(self, seconds: float) -> bool:
        """Whether work of about `seconds`, started now, would end past the deadline."""
        return self.clock() + seconds > self.deadline

    def check_room_for_first_pass(self, needed: float, what: str) -> None:
        """A UsageError when the first signal (`what`, about `needed` seconds from now) would end past the deadline;
        it names the least budget that would do (what is spent already, the pass, and a fifth to spare)."""
        if not self.would_pass(needed):
            return
        least = (self.clock() - self.began + needed) * 1.2
        at_least = f"{math.ceil(least)}s" if least < 60 else f"{math.ceil(least / 60)}m"
        raise UsageError(f"--budget {self.text} is too small for even {what}: about {needed:.1f} s here; give at "
                         f"least {at_least} (or drop --budget)")

