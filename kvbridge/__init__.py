"""kvbridge: disaggregated LLM serving with a KV cache transceiver over NIXL or UCX."""

__version__ = "0.1.0"
