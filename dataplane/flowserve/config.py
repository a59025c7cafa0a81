"""Engine configuration: what the operator chooses, and how `None` ("auto") resolves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.platform import Platform, detect_device, get_platform, is_available

DType = Literal["float32", "bfloat16", "float16"]
Device = Literal["cpu", "cuda", "npu"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass(slots=True)
class EngineConfig:
    """`None` means auto: the device is the best one present (cuda, npu, cpu), the dtype float32
    on a host and bfloat16 on an accelerator, max_model_len min(max_position_embeddings, 4096)."""

    model: str
    dtype: DType | None = None
    device: Device | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64
    # Chunked prefill: at most this many tokens are computed per step (decodes count one each).
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # The KV cache budget: a fixed number of bytes, or a fraction of the memory free after the
    # weights are loaded; neither means the device default (see `kv_cache_fraction_or_default`).
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = None
    # A JSON file holding the activation peak of a profiling pass: read when it matches this
    # model and config (skipping the pass at scale-up), written after a pass otherwise.
    memory_profile: str | None = None
    # Everything eager: no decode graphs. Kernels are the same either way.
    enforce_eager: bool = False
    # Overlap the host's work for the next step with the device's current one (None: where the
    # device runs asynchronously to the host, i.e. where the platform has events).
    async_scheduling: bool | None = None
    # A node's DRAM preload cache (flowserve.weights_cache): when it holds this model in this
    # dtype, the weights are mapped from it (shared with the node's other instances), not read.
    weights_cache: str | None = None
    # A running instance's weight socket on the same GPU (dataplane.scaleout.cuda_share): the
    # weights are taken from it first, opened in place (share) or copied device-to-device.
    weights_peer: str | None = None
    weights_peer_mode: Literal["copy", "share"] = "copy"
    seed: int = 0
    # semi-PD (docs/flowserve.md): a prefill worker and a decode worker in this instance, each
    # on its own share of the device's compute (SMs, or a host's threads), over one copy of the
    # weights and one KV pool. The split starts at `semi_pd_split` percent for prefill and
    # follows the SLOs (Algorithm 1) each `semi_pd_window_s`, unless `semi_pd_static`.
    semi_pd: bool = False
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    semi_pd_split: int = 50
    semi_pd_static: bool = False
    semi_pd_window_s: float = 5.0
    # The compute units split between the workers (None: all of the device's).
    semi_pd_units: int | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")
        if self.device is not None and self.device not in ("cpu", "cuda", "npu"):
            raise ConfigError(f"device must be cpu, cuda or npu, not {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len must be at least 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")
        if self.block_size < 1:
            raise ConfigError("block_size must be at least 1")
        if self.weights_peer_mode not in ("copy", "share"):
            raise ConfigError(f"weights_peer_mode is copy or share, not {self.weights_peer_mode}")
        if self.kv_cache_bytes is not None and self.kv_cache_fraction is not None:
            raise ConfigError("give kv_cache_bytes or kv_cache_fraction, not both")
        if self.semi_pd:
            self._check_semi_pd()

    def _check_semi_pd(self) -> None:
        slos = (self.slo_ttft_ms, self.slo_tpot_ms)
        if not self.semi_pd_static and None in slos:
            raise ConfigError("semi-PD needs a TTFT and a TPOT SLO (or a static split)")
        if any(slo is not None and slo <= 0 for slo in slos):
            raise ConfigError("the TTFT and TPOT SLOs must be positive")
        if not 0 < self.semi_pd_split < 100:
            raise ConfigError(
                f"semi_pd_split is the prefill's percent in (0, 100), not {self.semi_pd_split}"
            )
        if self.semi_pd_window_s <= 0:
            raise ConfigError("semi_pd_window_s must be positive")
        if self.semi_pd_units is not None and self.semi_pd_units < 1:
            raise ConfigError("semi_pd_units must be at least 1")

    def kv_cache_fraction_or_default(self, platform: Platform) -> float | None:
        """None when a byte budget is set; else the fraction asked for, or the platform's
        default: most of a GPU's free memory, a modest share of a host's (instances there share
        the machine)."""
        if self.kv_cache_bytes is not None:
            return None
        if self.kv_cache_fraction is not None:
            return self.kv_cache_fraction
        return platform.kv_fraction_default


def resolve_device(device: Device | None) -> torch.device:
    if device is None:
        return detect_device()
    if not is_available(device):
        raise ConfigError(f"device {device} was asked for but none is present")
    return torch.device(device)


def resolve_dtype(dtype: DType | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return get_platform(device).dtype_default
    return DTYPES[dtype]


def resolve_max_model_len(requested: int | None, hf_config: dict[str, Any]) -> int:
    """The model's limit caps what the operator asks for; asking past it is an error, as in vLLM."""
    limit = hf_config.get("max_position_embeddings")
    if requested is None:
        return DEFAULT_MAX_MODEL_LEN if limit is None else min(int(limit), DEFAULT_MAX_MODEL_LEN)
    if limit is not None and requested > int(limit):
        raise ConfigError(
            f"max_model_len {requested} is larger than the model's max_position_embeddings {limit}"
        )
    return requested
