"""float32 products on CPU that give a row the same bits in any batch and on any number of
threads: what disaggregated = aggregated output rests on in float32.

torch's float32 ``F.linear`` runs MKL's sgemm. On Intel CPUs (a Sapphire Rapids-class VM) MKL
picks other kernels for batches of 1-13 rows, and on 2 threads for some shapes of 64-100
rows, and those give a row other bits than a larger batch does. In MKL's strict conditional
numerical reproducibility mode (``MKL_CBWR=AUTO,STRICT``) every row count and thread count
gave the same bits, at the same speed (the default model's shapes, 1-600 rows). MKL reads the
variable at its first call, so it is set when the engine is imported, unless it is set
already. On AMD CPUs MKL runs other code paths; there the engine pads batches of fewer than
12 rows instead (``models/packed.py``, ``float32_rows``), and the variable is left alone.
"""

from __future__ import annotations

import os


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def reproducible_blas() -> None:
    if "MKL_CBWR" not in os.environ and cpu_vendor() == "GenuineIntel":
        os.environ["MKL_CBWR"] = "AUTO,STRICT"
