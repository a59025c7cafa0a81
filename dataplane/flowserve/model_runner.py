"""Runs the model. For now a Hugging Face model with one `DynamicCache` per sequence; the paged,
batched runner replaces this module without changing `Engine`'s interface."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.sequence import Sequence


def load_model(path: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map=device, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a causal LM from {path}: {exc}") from exc
    model.eval()  # type: ignore[no-untyped-call]
    return model


class ModelRunner:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device

    @torch.inference_mode()
    def forward(self, batch: Seq[Sequence]) -> torch.Tensor:
        """Next-token logits of each sequence, [num_seqs, vocab_size]. A sequence's first forward
        is its prefill (the whole prompt); later ones feed only its last token."""
        rows = []
        for seq in batch:
            if seq.runner_state is None:
                seq.runner_state = DynamicCache(config=self.model.config)
                new_ids = seq.prompt_token_ids
            else:
                new_ids = seq.output_token_ids[-1:]
            input_ids = torch.tensor([new_ids], dtype=torch.long, device=self.device)
            out = self.model(
                input_ids=input_ids,
                past_key_values=seq.runner_state,
                use_cache=True,
                logits_to_keep=1,
            )
            rows.append(out.logits[0, -1])  # [vocab_size]
        return torch.stack(rows)

    def free(self, seq: Sequence) -> None:
        seq.runner_state = None
