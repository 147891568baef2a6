"""KV storage: one contiguous region for all layers, addressed by (layer, block).

Layout (one tensor, C order):

    storage: (num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim)
                                      ^ 0 = K, 1 = V

so block ``b`` of layer ``l`` is one contiguous span of ``block_bytes`` bytes at

    base + (l * num_blocks + b) * block_bytes

and a run of consecutive block ids of one layer is one contiguous span too: a transfer
layer registers the region once and describes any set of blocks as one descriptor per
(layer, run of consecutive ids).

On CPU the region is an anonymous mapping, 2 MiB aligned and advised for transparent huge
pages (where the kernel offers them: THP ``madvise`` or ``always``): a KV transfer copies
across processes page by page, and with 2 MiB pages a 16 MiB transfer over UCX's cma ran
1.5x faster on this project's test machine (see docs/tuning.md).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass

import torch

from kvbridge.engine.host_memory import host_region

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # float32 | bfloat16 | float16

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize  # (a tensor to ask would cost ~60 µs on a transfer's path)

    @functools.cached_property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer (K and V); cached: asked on every transfer's path."""
        return 2 * self.num_kv_heads * self.block_size * self.head_dim * self.itemsize

    @property
    def layer_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.block_bytes // self.block_size

    def offset(self, layer: int, block: int) -> int:
        """Byte offset of (layer, block) from the start of the region."""
        return (layer * self.num_blocks + block) * self.block_bytes

    def fingerprint(self, model_id: str) -> str:
        """What must match between two engines exchanging KV (num_blocks may differ)."""
        d = asdict(self)
        d.pop("num_blocks")
        text = model_id + "|" + "|".join(f"{k}={d[k]}" for k in sorted(d))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def fingerprint_fields(self, model_id: str) -> dict[str, object]:
        d = asdict(self)
        d.pop("num_blocks")
        return {"model": model_id, **d}


class KVCache:
    """The engine's KV storage. ``layers[l]`` is a view (num_blocks, 2, kvh, bs, hd)."""

    def __init__(self, layout: KVLayout, device: str | torch.device = "cpu") -> None:
        self.layout = layout
        self.device = torch.device(device)
        shape = (layout.num_layers, layout.num_blocks, 2, layout.num_kv_heads, layout.block_size, layout.head_dim)
        if self.device.type == "cpu":
            self.huge_pages, region = host_region(layout.total_bytes)
            self.storage = region.view(layout.torch_dtype).view(shape)
        else:
            self.huge_pages = False
            self.storage = torch.zeros(shape, dtype=layout.torch_dtype, device=self.device)
        self.layers = list(self.storage.unbind(0))

    @property
    def base_address(self) -> int:
        return self.storage.data_ptr()

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def block(self, layer: int, block: int) -> torch.Tensor:
        """(2, kvh, bs, hd) view of one block of one layer."""
        return self.layers[layer][block]

    def as_bytes(self) -> torch.Tensor:
        """The whole region as a flat uint8 view (for checksums and tests)."""
        return self.storage.view(-1).view(torch.uint8)

    def block_bytes_view(self, layer: int, block: int) -> torch.Tensor:
        start = self.layout.offset(layer, block)
        return self.as_bytes()[start : start + self.layout.block_bytes]


def num_blocks_for_memory(memory_mb: int, num_layers: int, num_kv_heads: int, block_size: int, head_dim: int, dtype: str) -> int:
    per_block = num_layers * 2 * num_kv_heads * block_size * head_dim * TORCH_DTYPES[dtype].itemsize
    return max(1, memory_mb * 1024 * 1024 // per_block)
