"""dovecot_index.memory: the command line's allocator setting takes effect."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# arrays of 1, 0.5 and 2 MB allocated and freed 20 times; the page faults after the
# first round (which faults everything in once either way) are printed
_PROBE = """
import resource, sys
import numpy as np
from dovecot_index.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n, later = 1 << 17, 0
for i in range(20):
    before = faults()
    a = np.ones(n); b = np.ones(n // 2); del a; c = np.ones(n * 2); del b; del c
    later += faults() - before if i else 0
print(later)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))

    def later_faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True,
                             text=True, check=True, env=env)
        return int(out.stdout.strip())

    # glibc's default gives blocks of this size back (unmapped or trimmed) and faults
    # their pages in again (about 900 faults here); kept, they are reused as they are
    assert later_faults("default") > 200
    assert later_faults("keep") < 50
