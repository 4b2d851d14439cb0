"""Shared by the benchmarks: best-of timing and the report printer."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    """The fastest of ``repeat`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def report(result: dict[str, Any], as_json: bool, width: int = 32) -> None:
    """Print the figures as JSON or as aligned ``key value`` lines."""
    if as_json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        for key, value in result.items():
            print(f"{key:{width}s} {value}")
