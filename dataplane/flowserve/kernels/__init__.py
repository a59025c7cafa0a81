"""FlowServe's Triton kernels: paged attention (decode and prefill), the KV store, RMSNorm with the
residual add, rotary embedding and SiLU-and-mul. Each has a plain PyTorch reference in the tests
and runs on the CPU under `TRITON_INTERPRET=1`. Import this package only where Triton is known to
import (`platform.triton_kernels`); the engine's host path never does.
"""

from __future__ import annotations

from dataplane.flowserve.kernels.layers import rms_norm, rotary_embedding, silu_and_mul, store_kv
from dataplane.flowserve.kernels.paged_attention import (
    decode_partitions,
    paged_decode_attention,
    paged_prefill_attention,
)

__all__ = [
    "decode_partitions",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]
