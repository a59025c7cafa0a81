"""ModelConfig: the shape of a Llama-family checkpoint, read from its Hugging Face config.json.

Llama, Mistral and Qwen2 share one architecture here; they differ only in a few flags (Qwen2's
q/k/v bias, Llama's optional o_proj and MLP bias) and in how their config.json spells rope.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataplane.flowserve.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent stretch of rope (rope_type "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str  # llama | mistral | qwen2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None  # None: plain rope (rope_type "default")
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q_proj, k_proj and v_proj
    o_proj_bias: bool
    mlp_bias: bool  # bias on gate_proj, up_proj and down_proj
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Attention is windowed past this many tokens; full attention is exact only up to it, so
    # the engine must keep max_model_len within it. None: full attention at every length.
    sliding_window: int | None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_folder(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} has no config.json") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {config_path}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{config_path} does not hold a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Parse a config.json of transformers 4 or 5 (they spell rope differently)."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ConfigError(f"hidden_act {hidden_act!r} is not supported; only silu is")
        hidden_size = _int(raw, "hidden_size")
        num_heads = _int(raw, "num_attention_heads")
        num_kv_heads = _int(raw, "num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {num_heads} is not a multiple of "
                f"num_key_value_heads {num_kv_heads}"
            )
        head_dim = raw.get("head_dim") or hidden_size // num_heads
        theta, scaling = _rope(raw)
        is_qwen2 = model_type == "qwen2"
        is_llama = model_type == "llama"
        return cls(
            model_type=model_type,
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_int(raw, "max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=is_qwen2 or (is_llama and bool(raw.get("attention_bias", False))),
            o_proj_bias=is_llama and bool(raw.get("attention_bias", False)),
            mlp_bias=is_llama and bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_token_ids(raw.get("eos_token_id")),
            sliding_window=_sliding_window(raw),
        )


def _int(raw: dict[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.json needs a positive integer {key}, not {value!r}")
    return value


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(raw: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    # transformers 5 writes rope_parameters {rope_type, rope_theta, ...}; older configs have a
    # top-level rope_theta and rope_scaling {type | rope_type, factor, ...} or null.
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        try:
            return theta, Llama3RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as exc:
            raise ConfigError(f"llama3 rope scaling needs {exc.args[0]}") from None
    raise ConfigError(f"rope_type {rope_type!r} is not supported; supported: default, llama3")


def _sliding_window(raw: dict[str, Any]) -> int | None:
    window = raw.get("sliding_window")
    if raw.get("model_type") == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    return int(window) if window else None
