import platform
import subprocess
import sys

import pytest

from weight_diff import heap

# 40 blocks, each with three 4 MiB temporaries alive at once (a mask, indices, a cast), freed together at its end;
# print the page faults they took.
_BLOCKS = """
import resource, sys
import numpy as np
from weight_diff import heap
kept = heap.keep_freed_memory() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    temporaries = [np.ones(2**20, dtype=np.float32) for _ in range(3)]
    del temporaries
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", _BLOCKS, mode], capture_output=True, text=True, check=True)
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept, faults = _faults("keep")
    _, default = _faults("default")
    assert kept == "True"
    assert default >= 40 * 1024 * 0.9  # glibc trims the freed top of its heap: 4 MiB faulted in again every block
    assert faults < 2 * 1024  # the first block's pages, then reuse


def test_elsewhere_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert heap.keep_freed_memory() is False
