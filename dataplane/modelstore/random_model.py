"""create_random: a random-weight Llama folder that loads in transformers and FlowServe."""

from __future__ import annotations

from pathlib import Path

from .folder import inspect_folder
from .presets import PRESETS, Preset, get_preset
from .progress import Progress, report
from .staging import staged
from .tokenizer_build import TokenIds, write_tokenizer

__all__ = ["PRESETS", "Preset", "create_random"]


def create_random(
    dest: Path,
    preset: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> Path:
    """Write a random Llama of the named preset into dest (which must not exist or be empty).

    Returns dest. The same preset, seed and dtype give the same bytes.
    """
    # Imported here so that importing the package (the CLI does, for every command) stays free
    # of torch.
    from .weights import get_dtype, write_weights

    shape = get_preset(preset)
    torch_dtype = get_dtype(dtype)
    with staged(dest) as staging:
        report(progress, "tokenizer", 0, 1)
        ids = write_tokenizer(
            staging.model,
            max_vocab_size=shape.vocab_size,
            model_max_length=shape.max_position_embeddings,
        )
        report(progress, "tokenizer", 1, 1)
        _write_configs(staging.model, shape, ids, dtype)
        write_weights(staging.model, shape, seed=seed, dtype=torch_dtype, progress=progress)
        # Catches a broken writer before the folder becomes visible under dest.
        inspect_folder(staging.model)
    return dest


def _write_configs(dest: Path, shape: Preset, ids: TokenIds, dtype: str) -> None:
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        initializer_range=0.02,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )
    config.save_pretrained(dest)
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad
    ).save_pretrained(dest)
