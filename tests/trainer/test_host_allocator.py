"""``trainer.runtime.host_allocator``: with the trainer's settings freed memory is reused without new page faults, also
when a thread other than the main one allocates (gloo's workers do); glibc's defaults fault every page in again.
One arena takes only before a second thread has allocated, and says so."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# As trainer/run.py does: one arena before torch (and numpy, whose BLAS starts a thread) is imported, then the
# rest.  Then allocates, fills and frees a 96 MiB tensor (the supernet's gradients) 20 times on the main thread
# and 20 times on a new thread, and prints the minor page faults of the last 4 rounds on each.  (Kept, glibc's
# aligned allocation of a block this size settles only once its heap holds enough free blocks: the aligned
# request is a little larger than the block freed before it, and the remainders split the free space; in ten
# runs here the faults stopped after 3 to 8 rounds.)  In a fresh process, since the settings are process-wide
# and cannot be undone.
SCRIPT = r"""
import json, resource, sys, threading
from trainer.runtime.host_allocator import keep_freed_memory, share_one_arena
shared = share_one_arena() if sys.argv[1] == "kept" else None
import torch
kept = keep_freed_memory() if sys.argv[1] == "kept" else None

def faults_of_last_rounds(out, key):
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(24 * 2**20).sum()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    out[key] = faults[-4:]

out = {"shared": shared, "kept": kept}
faults_of_last_rounds(out, "main")
worker = threading.Thread(target=faults_of_last_rounds, args=(out, "thread"))
worker.start()
worker.join()
print(json.dumps(out))
"""

PAGES = 96 * 2**20 // 4096


def run(script: str, *args: str, repo) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=repo, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults(repo):
    default, kept = run(SCRIPT, "default", repo=repo), run(SCRIPT, "kept", repo=repo)
    assert kept["shared"] is True and kept["kept"] is True
    # glibc's defaults: the tensor is mmapped afresh each time, every page faulted in again
    assert all(faults > PAGES // 2 for faults in default["main"] + default["thread"]), default
    # kept: once settled, every round reuses the heap's pages
    assert all(faults < PAGES // 20 for faults in kept["main"] + kept["thread"]), kept


def test_one_arena_is_refused_once_a_thread_has_its_own(repo):
    script = r"""
import json, threading
from trainer.runtime import host_allocator
before = host_allocator.arena_count()
worker = threading.Thread(target=lambda: bytearray(1 << 20))
worker.start()
worker.join()
print(json.dumps({"before": before, "after": host_allocator.arena_count(), "shared": host_allocator.share_one_arena(),
                  "flag": host_allocator.one_arena}))
"""
    out = run(script, repo=repo)
    assert out == {"before": 1, "after": 2, "shared": False, "flag": False}
