"""Native CPU kernels for bfloat16, compiled from C on first use with the machine's compiler.

- ``paged_attention.c``: paged attention, each query row (a decode token, or a prompt token
  with its position as causal bound) against the K/V of its blocks, read in place. torch's
  path gathers every request's blocks into a padded copy and runs two batched matmuls, a mask
  and a softmax: ~14 ms of a 44 ms batch-8 decode step of the default model on a 2-core VM;
  the kernel reads each key and value once. A prompt token gets the bits a decode step would.
- ``linear.c``: the model's linear layers (AVX512-BF16), weights packed once for it. A decode
  step's products stream every weight from memory once for all its rows; oneDNN's took
  ~1.5x as long for the same weights (see ``NativeLinear``). ``linear_amx.c``: the same
  products on AMX tiles, for every row count, where the CPU has them. ``linear_codes.c``:
  for a few rows (a decode step), the same products with the weights read as their GGUF
  codes (Q4_1, Q8_0) and rebuilt tile by tile into the same bfloat16 values: 0.625 or 1.06
  bytes a weight to stream instead of 2.
- ``elementwise.c``: RMSNorm (with the residual add before it), SiLU(gate)·up and RoPE, one
  call each instead of 5-10 small torch ops.

The shared library (all ``*.c`` of this folder) is built with ``-O3 -march=native -fopenmp`` into a cache folder
(``$KVBRIDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvbridge``, else ``~/.cache/kvbridge``),
named by a hash of the source, the flags and the compiler, so each machine builds its own
once (~1 s); concurrent builders each write a temporary file and rename it into place.
It links libgomp by its soname, so in a process that imported torch first it shares
torch's OpenMP runtime. No compiler, or a failed build: ``load()`` says why, and the engine
keeps torch's attention (``attention_backend: auto``) or refuses to start (``native``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("kvbridge.engine.native")

SOURCES = sorted(Path(__file__).parent.glob("*.c"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    if os.environ.get("KVBRIDGE_CACHE_DIR"):
        return Path(os.environ["KVBRIDGE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvbridge"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise NativeUnavailable("no C compiler (cc or gcc) on PATH")
    return cc


def build() -> Path:
    """The shared library for this source, flags and compiler: cached, else built now."""
    cc = _compiler()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"{cc} does not run: {e}") from None
    key = hashlib.sha256("\0".join([*(s.read_text() for s in SOURCES + HEADERS), *FLAGS, version]).encode()).hexdigest()[:16]
    name = f"kernels-{key}.so"
    # the cache folder, else one in the temporary folder (a read-only home, say)
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"kvbridge-{os.getuid()}"):
        lib = folder / name
        if lib.exists():
            return lib
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kernels-", suffix=".so")
            break
        except OSError as e:
            log.debug("cannot write to %s: %s", folder, e)
    else:
        raise NativeUnavailable(
            f"no writable folder for the kernels' library (tried {cache_dir()} and the temporary folder)"
        )
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise NativeUnavailable(f"{cc} failed on the native kernels: {done.stderr.strip()[-400:]}")
        os.replace(tmp, lib)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"building the native kernels failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built native kernels: %s", lib)
    return lib


def data_ptr(t: torch.Tensor | None) -> int | None:
    """A tensor's address for a C call; None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


@dataclass(frozen=True)
class PagedAttention:
    """``paged_attention_bf16`` of the built library, called with torch tensors."""

    fn: ctypes._CFuncPtr
    scratch_floats: ctypes._CFuncPtr  # per thread, for (g, hd, max_len)

    def __call__(
        self, q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, max_len: int,
        row_table: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """q (B, nh, hd) bf16, scaled; kv_layer (num_blocks, 2, nkv, bs, hd) bf16; tables
        (R, width) block ids and lens (B,) int64: query row b attends to the first lens[b] ≤
        max_len ≤ width * bs tokens of table row ``row_table[b]`` (None: row b) → (B, nh, hd)."""
        B, nh, hd = q.shape
        _, _, nkv, bs, _ = kv_layer.shape
        q = q.contiguous()
        out = torch.empty_like(q)
        threads = torch.get_num_threads()
        scratch = torch.empty(threads * self.scratch_floats(nh // nkv, hd, max_len), dtype=torch.float32)
        rc = self.fn(
            q.data_ptr(), kv_layer.data_ptr(), tables.data_ptr(), lens.data_ptr(), data_ptr(row_table), out.data_ptr(),
            scratch.data_ptr(), B, nkv, nh // nkv, hd, bs, tables.shape[1], max_len, threads,
        )  # fmt: skip
        if rc == -2:
            raise MemoryError("paged_attention_bf16: out of memory")
        if rc != 0:
            raise ValueError(f"paged_attention_bf16: unsupported shape (heads {nh}/{nkv}, head dim {hd}, block size {bs})")
        return out


@dataclass(frozen=True)
class LinearKernel:
    """``linear_bf16`` of the built library; ``available``: 0 without AVX512-BF16 (the
    kernel refuses), 1 with it, 2 where it runs on AMX tiles (``linear_amx.c``)."""

    fn: ctypes._CFuncPtr  # linear_bf16_coded
    available: int

    def __call__(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
        codes: torch.Tensor | None = None, kind: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """x (M, K) bf16, contiguous; packed from ``pack_linear_weight``; bias float32 padded
        to a multiple of 16, or None; codes: the same weight's GGUF codes of ggml type
        ``kind`` (``pack_codes``), which a few rows run on where the tiles are AMX, or None
        → (M, out_features) bf16."""
        if x.dtype != torch.bfloat16 or not x.is_contiguous():
            raise ValueError(f"linear_bf16 takes contiguous bfloat16 rows, not {x.dtype} with strides {x.stride()}")
        M, K = x.shape
        if packed.shape[1] * 2 != K:
            raise ValueError(f"linear_bf16: {K} inputs for a weight packed for {packed.shape[1] * 2}")
        out = torch.empty(M, out_features, dtype=torch.bfloat16)
        rc = self.fn(
            x.data_ptr(), packed.data_ptr(), data_ptr(codes), kind, data_ptr(bias), out.data_ptr(),
            M, out_features, K, torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"linear_bf16: cannot run {M}x{K} by {out_features} here (code {rc})")
        return out


def packed_linear_bytes(n: int, k: int) -> int:
    """Bytes of ``pack_linear_weight`` of an (n, k) weight."""
    return -(-n // 16) * 16 * k * 2


def pack_linear_weight(weight: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) bf16 → (ceil(N/16), K/2, 16, 2): for each block of 16 outputs and each pair of
    inputs, the 16 outputs' two weights side by side (``linear.c``); N padded with zeros.
    ``into``: uint8 memory of ``packed_linear_bytes(N, K)`` to hold it (else new memory)."""
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"native linear layers need an even number of inputs, not {k}")
    blocks = -(-n // 16)
    padded = torch.zeros(blocks * 16, k, dtype=torch.bfloat16)
    padded[:n] = weight
    packed = padded.view(blocks, 16, k // 2, 2).permute(0, 2, 1, 3)
    if into is None:
        return packed.contiguous()
    return into.view(torch.bfloat16).view(blocks, k // 2, 16, 2).copy_(packed)


CODE_KINDS = {"Q4_1": 3, "Q8_0": 8}  # GGUF types whose codes linear_codes.c takes: their ggml ids
_BLOCK_BYTES = {3: 20, 8: 34}  # bytes of one block of 32 weights


def pack_codes(lib: ctypes.CDLL, kind: int, blocks: np.ndarray, n: int, k: int, into: torch.Tensor) -> None:
    """GGUF blocks of ggml type ``kind`` of an (n, k) weight (uint8, n rows of k/32 blocks)
    into ``into`` (uint8, ``lib.codes_packed_bytes(kind, n, k)``), as ``linear_codes.c`` reads them."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    if k % 32 or blocks.size != n * (k // 32) * _BLOCK_BYTES.get(kind, 0) or into.numel() != lib.codes_packed_bytes(kind, n, k):
        raise ValueError(f"codes of type {kind} of a {n}x{k} weight: {blocks.size} bytes for {into.numel()} packed")
    lib.codes_pack(kind, blocks.ctypes.data, n, k, into.data_ptr())


@dataclass(frozen=True)
class ElementwiseOps:
    """``elementwise.c``'s functions, called with torch tensors (bfloat16, CPU)."""

    lib: ctypes.CDLL

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' RMSNorm of each row of x (…, D)."""
        return self._rmsnorm(x.contiguous(), None, None, weight, eps)

    def add_rmsnorm(self, x: torch.Tensor, add: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, RMSNorm(h)) with h = x + add, as two bf16 ops would give them."""
        x = x.contiguous()
        h = torch.empty_like(x)
        return h, self._rmsnorm(x, add.contiguous(), h, weight, eps)

    def _rmsnorm(self, x: torch.Tensor, add: torch.Tensor | None, h: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        D = x.shape[-1]
        self.lib.rmsnorm_bf16(x.data_ptr(), data_ptr(add), data_ptr(h), weight.data_ptr(), out.data_ptr(), x.numel() // D, D, eps, torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of (T, 2I) gate|up → (T, I)."""
        gate_up = gate_up.contiguous()
        T, I2 = gate_up.shape
        out = torch.empty(T, I2 // 2, dtype=gate_up.dtype)
        self.lib.silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), T, I2 // 2, torch.get_num_threads())
        return out

    def rope_(self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """Rotate, in place, the first ``heads`` heads of each row of x (T, ≥ heads*head_dim),
        rows contiguous inside; cos and signed_sin (T, head_dim) bf16 (``Rotary.tables``)."""
        if x.stride(-1) != 1 or head_dim > 512 or head_dim % 2:
            raise ValueError(f"rope_bf16: unsupported layout (head dim {head_dim}, strides {x.stride()})")
        T = x.shape[0]
        self.lib.rope_bf16(x.data_ptr(), x.stride(0), cos.data_ptr(), signed_sin.data_ptr(), T, heads, head_dim, torch.get_num_threads())

    def rope_store(
        self, qkv: torch.Tensor, nh: int, nkv: int, head_dim: int, cos: torch.Tensor, signed_sin: torch.Tensor, scale: float,
        kv_layer: torch.Tensor, rows: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """One call for what a layer does between its q|k|v product and attention: RoPE on q
        and k, q times ``scale``, k and v into the cache (``attention.write_kv``'s rows, int64).
        qkv (T, (nh + 2 nkv) hd), rows contiguous inside, is left as it was → q (T, nh, hd),
        the same bits as ``rope_``, ``q * scale`` and ``write_kv`` give."""
        T = qkv.shape[0]
        if qkv.stride(-1) != 1 or qkv.shape[1] != (nh + 2 * nkv) * head_dim or head_dim > 512 or head_dim % 2:
            raise ValueError(f"rope_store_bf16: unsupported layout (head dim {head_dim}, shape {tuple(qkv.shape)}, strides {qkv.stride()})")
        if rows.dtype != torch.int64 or rows.numel() != T * 2 * nkv or not kv_layer.is_contiguous():
            raise ValueError(f"rope_store_bf16: {rows.numel()} {rows.dtype} cache rows for {T} tokens of {nkv} KV heads")
        q = torch.empty(T, nh, head_dim, dtype=qkv.dtype)
        self.lib.rope_store_bf16(
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), signed_sin.data_ptr(), T, nh, nkv, head_dim, scale,
            q.data_ptr(), kv_layer.data_ptr(), rows.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return q


@dataclass(frozen=True)
class Kernels:
    paged_attention: PagedAttention
    linear: LinearKernel
    elementwise: ElementwiseOps
    lib: ctypes.CDLL  # the library itself, its functions typed (models/native_layers.py calls the layer ones)


@cache
def load() -> Kernels:
    """Build (once per machine) and load the kernels; raises ``NativeUnavailable``."""
    path = build()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path}: {e}") from None
    c_ptr, c_i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {  # name: (return type, argument types), as the C files declare them
        "paged_attention_bf16": (c_int, [c_ptr] * 7 + [c_i64] * 7 + [c_int]),
        "paged_attention_scratch": (c_i64, [c_i64] * 3),
        "linear_bf16": (c_int, [c_ptr] * 4 + [c_i64] * 3 + [c_int]),
        "linear_bf16_coded": (c_int, [c_ptr] * 3 + [c_int] + [c_ptr] * 2 + [c_i64] * 3 + [c_int]),
        "linear_codes_amx": (c_int, [c_int] + [c_ptr] * 4 + [c_i64] * 3 + [c_int]),
        "codes_packed_bytes": (c_i64, [c_int, c_i64, c_i64]),
        "codes_pack": (c_int, [c_int, c_ptr, c_i64, c_i64, c_ptr]),
        "codes_matches": (c_i64, [c_int, c_ptr, c_ptr, c_i64, c_i64]),
        "rmsnorm_bf16": (None, [c_ptr] * 5 + [c_i64, c_i64, ctypes.c_float, c_int]),
        "silu_mul_bf16": (None, [c_ptr, c_ptr, c_i64, c_i64, c_int]),
        "rope_bf16": (None, [c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_i64, c_i64, c_int]),
        "rope_store_bf16": (None, [c_ptr, c_i64, c_ptr, c_ptr] + [c_i64] * 4 + [ctypes.c_float, c_ptr, c_ptr, c_ptr, c_int]),
        "layer_work_elems": (c_i64, [c_i64] * 6),
        "decoder_layer_bf16": (c_int, [c_ptr] * 4),  # its two structs by reference (models/native_layers.py)
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    # AMX tiles for the products where the CPU has them, before the first product (their bits
    # differ from the AVX512-BF16 tiles'); KVBRIDGE_NATIVE_AMX=0 keeps the AVX512-BF16 tiles
    lib.linear_bf16_use_amx(c_int(os.environ.get("KVBRIDGE_NATIVE_AMX", "1") != "0"))
    return Kernels(PagedAttention(lib.paged_attention_bf16, lib.paged_attention_scratch), LinearKernel(lib.linear_bf16_coded, lib.linear_bf16_available()), ElementwiseOps(lib), lib)
