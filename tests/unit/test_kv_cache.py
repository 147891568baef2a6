"""The KV region: addressing by (layer, block), and host memory on huge pages."""

from __future__ import annotations

from pathlib import Path

import torch

from kvbridge.engine.host_memory import HUGE_PAGE, host_region
from kvbridge.engine.kv_cache import KVCache, KVLayout


def _thp_mode() -> str:
    """The bracketed word of the kernel's THP setting ("" when the kernel has no THP)."""
    p = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not p.exists():
        return ""
    text = p.read_text()
    return text[text.index("[") + 1 : text.index("]")]


def _huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_blocks_are_addressed_by_layer_and_index() -> None:
    lay = KVLayout(num_layers=3, num_blocks=7, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16")
    kv = KVCache(lay)
    assert kv.storage.is_contiguous() and not kv.storage.any()
    assert kv.storage.shape == (3, 7, 2, 2, 4, 8)
    for layer, block in [(0, 0), (1, 3), (2, 6)]:
        assert kv.block(layer, block).data_ptr() == kv.base_address + lay.offset(layer, block)
        kv.block(layer, block).fill_(layer * 10 + block)
        view = kv.block_bytes_view(layer, block).view(torch.float16)
        assert view.numel() * 2 == lay.block_bytes and bool((view == layer * 10 + block).all())
    assert kv.as_bytes().numel() == lay.total_bytes


def test_host_region_is_aligned_zeroed_and_on_huge_pages_where_the_kernel_offers_them() -> None:
    advised, region = host_region(8 * HUGE_PAGE + 12345)
    assert region.numel() == 8 * HUGE_PAGE + 12345 and region.dtype == torch.uint8
    assert region.data_ptr() % HUGE_PAGE == 0
    assert not region.any()
    if _thp_mode() in ("madvise", "always"):
        assert advised
        # faulted in at creation: the kernel gave 2 MiB pages (this machine's test VM: all 8)
        assert _huge_kib(region.data_ptr()) >= HUGE_PAGE // 1024
    else:  # THP off: small pages, and the region works the same
        assert _huge_kib(region.data_ptr()) == 0
    region[-1] = 7  # the tail past the last whole huge page is usable too
    assert int(region[-1]) == 7


def test_an_engine_sized_region_reports_its_pages() -> None:
    kv = KVCache(KVLayout(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32"))
    assert kv.huge_pages == (_thp_mode() in ("madvise", "always"))
    assert kv.base_address % HUGE_PAGE == 0
