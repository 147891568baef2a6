"""The device the model and transfer tests put their weights and KV on.

``KVBRIDGE_TEST_DEVICE`` (default ``cpu``); ``make test-gpu`` runs the engine, transfer and
disaggregated tests with ``cuda``: KV in VRAM, registered with NIXL and UCX as VRAM.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("KVBRIDGE_TEST_DEVICE", "cpu")
