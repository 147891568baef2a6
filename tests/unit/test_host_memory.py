"""keep_freed_memory: freed tensor memory is reused, not faulted in again; the user's setting wins."""

import os
import subprocess
import sys

from kvbridge.engine.host_memory import SETTINGS, keep_freed_memory

# A forward pass in miniature (one thread): MLP and attention-like products on 700 or 1024
# rows, the sizes alternating like prompts do; prints the page faults of each of passes 4-11
# (the first ones grow the heap).
CHILD = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from kvbridge.engine.host_memory import keep_freed_memory
    assert keep_freed_memory(), "nothing applied"
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
w1, w2 = torch.randn(576, 3072, generator=g) * 0.02, torch.randn(1536, 576, generator=g) * 0.02
def forward(rows):
    x = torch.randn(rows, 576, generator=g)
    for _ in range(4):
        h = x @ w1
        x = x + (torch.nn.functional.silu(h[:, :1536]) * h[:, 1536:]) @ w2
        x = x + torch.softmax(x @ x[: rows // 2].T, dim=-1) @ x[: rows // 2] * 0.01
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(4):
    forward(1024 if i % 2 else 700)
for i in range(8):
    f0 = faults()
    forward(1024 if i % 2 else 700)
    print(faults() - f0)
"""


def _child(code: str, *args: str) -> list[str]:
    """Run ``code`` in a fresh interpreter with malloc's own defaults; the words it prints."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.split()


def _faults(mode: str) -> int:
    """The median page faults of one pass. The median, because where the heap fragments (it
    depends on the CPU's matrix kernels), one pass in a few may still grow it: a CI machine
    once faulted 3,500 pages in 4 passes with the memory kept, against 24,000 without."""
    per_pass = sorted(int(word) for word in _child(CHILD, mode))
    return per_pass[len(per_pass) // 2]


def test_freed_tensor_memory_is_reused_without_page_faults():
    plain = _faults("plain")
    assert plain > 500, f"malloc's defaults faulted only {plain} pages a pass: the test shows nothing here"
    # the best of up to three runs: in a full `make test` one run with the memory kept once
    # had a median of 777 faults a pass (against 5692 without), while alone it stays far
    # below; memory that is not kept faults thousands of pages a pass in every run
    kept = [_faults("kept")]
    while min(kept) >= plain // 10 and len(kept) < 3:
        kept.append(_faults("kept"))
    assert min(kept) < plain // 10, f"with freed memory kept: {kept} faults a pass, against {plain} without"


def test_a_threshold_the_user_set_is_left_alone():
    env = {"MALLOC_TRIM_THRESHOLD_": "12345"}
    applied = keep_freed_memory(env)
    assert "MALLOC_TRIM_THRESHOLD_" not in applied
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(SETTINGS["MALLOC_MMAP_THRESHOLD_"][1])  # for UCX's allocator too


RELEASE_CHILD = """
import sys
import torch
from kvbridge.engine.host_memory import keep_freed_memory, release_freed_memory
keep_freed_memory()
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
ts = [torch.ones(1 << 18) for _ in range(256)]  # 256 MiB in 1 MiB tensors, kept when freed
del ts
before = rss()
released = release_freed_memory()
print(before, rss(), released)
"""


def test_release_hands_kept_memory_back_once():
    before, after, released = _child(RELEASE_CHILD)
    assert released == "True"
    assert int(before) - int(after) > 128, f"RSS {before} MiB before the release, {after} MiB after"
