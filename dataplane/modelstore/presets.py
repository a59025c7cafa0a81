"""Named shapes for random-weight Llama models.

The large presets copy the shapes of real checkpoints so that memory use and speed measured on a
random model match the real one; their outputs are noise.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownPreset


@dataclass(slots=True, frozen=True)
class Preset:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    description: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            tie_word_embeddings=True,
            description="unit tests: a few hundred KB",
        ),
        Preset(
            name="small",
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=512,
            vocab_size=2048,
            # Untied, so the lm_head path is exercised by something small.
            tie_word_embeddings=False,
            description="quick end-to-end runs: a few MB",
        ),
        Preset(
            name="smollm2-135m",
            hidden_size=576,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            intermediate_size=1536,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            description="SmolLM2-135M shape",
        ),
        Preset(
            name="llama-1b",
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
            # The real model uses llama3 rope scaling up to 128K; random weights gain nothing
            # from it, and plain rope keeps every engine able to run the preset.
            max_position_embeddings=8192,
            rope_theta=500000.0,
            description="Llama-3.2-1B shape",
        ),
        Preset(
            name="llama-8b",
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
            tie_word_embeddings=False,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            description="Llama-3-8B shape",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise UnknownPreset(f"unknown preset {name!r}; known presets: {known}") from None
