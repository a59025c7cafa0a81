"""One training run: LoRA on the base model, steps over the chat examples, checkpoints, merge."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from controlplane.wire import (
    TrainingCheckpoint,
    TrainingProgress,
    TrainingResult,
    TrainingStart,
)

from .checkpoints import Position, checkpoint_dir, load_checkpoint, save_checkpoint
from .dataset import IGNORE_INDEX, Batch, Example, collate, epoch_order, load_examples
from .merge import write_merged

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

Emit = Callable[[str, BaseModel], None]  # ("progress" | "checkpoint" | "result", message)
ShouldStop = Callable[[], bool]


def load_base(path: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, torch.device]:
    if not Path(path).is_dir():
        raise ValueError(f"base_model_path {path} is not a folder")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.to(device), tokenizer, device  # type: ignore[arg-type]


def add_lora(model: torch.nn.Module, rank: int, alpha: float) -> PeftModel:
    config = LoraConfig(
        # peft annotates lora_alpha as int; it only divides by r, so a float alpha is kept.
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    assert isinstance(peft_model, PeftModel)
    return peft_model


def batch_loss(model: torch.nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over the batch's assistant tokens (0 when it has none)."""
    logits = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).logits  # [batch, seq, vocab]
    labels = batch.labels.to(device)[:, 1:]  # token t predicts t + 1
    total = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int,
    device: torch.device,
) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        n = sum(e.num_label_tokens for e in chunk)
        total += batch_loss(model, collate(chunk, pad_id), device).item() * n
        count += n
    model.train()
    return total / max(count, 1)


def run(spec: TrainingStart, emit: Emit, should_stop: ShouldStop) -> TrainingResult | None:
    """Train, checkpoint, validate and merge. None when `should_stop` ended the run early."""
    hp = spec.hyperparameters
    torch.manual_seed(hp.seed)
    base, tokenizer, device = load_base(spec.base_model_path)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    examples = load_examples(spec.training_file, tokenizer, hp.max_seq_len)
    model = add_lora(base, hp.lora_rank, hp.lora_alpha)
    model.train()

    steps_per_epoch = math.ceil(len(examples) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, (total_steps - s) / total_steps)
    )
    position = Position(step=0, tokens=0, last_loss=math.nan)
    if spec.resume_from is not None:
        position = load_checkpoint(spec.resume_from, model, optimizer, scheduler)

    started = time.monotonic()
    for step in range(position.step + 1, total_steps + 1):
        if should_stop():
            return None
        epoch, index = divmod(step - 1, steps_per_epoch)
        order = epoch_order(len(examples), hp.seed, epoch)
        batch = collate(
            [examples[i] for i in order[index * hp.batch_size : (index + 1) * hp.batch_size]],
            pad_id,
        )
        learning_rate = float(scheduler.get_last_lr()[0])
        loss = batch_loss(model, batch, device)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        position = Position(step, position.tokens + batch.num_tokens, loss.item())
        emit("progress", TrainingProgress(
            step=step, total_steps=total_steps, epoch=step / steps_per_epoch,
            loss=position.last_loss, learning_rate=learning_rate, tokens=position.tokens,
            elapsed_s=time.monotonic() - started,
        ))
        if step % hp.checkpoint_every == 0 or step % steps_per_epoch == 0:
            path = save_checkpoint(
                checkpoint_dir(spec.output_dir, step), model, optimizer, scheduler, position
            )
            emit("checkpoint", TrainingCheckpoint(
                step=step, path=str(path), metrics={"loss": position.last_loss},
            ))
    if should_stop():
        return None

    valid_loss = None
    if spec.validation_file is not None:
        valid = load_examples(spec.validation_file, tokenizer, hp.max_seq_len)
        valid_loss = validation_loss(model, valid, hp.batch_size, pad_id, device)
    output_dir = Path(spec.output_dir)
    adapter_path = output_dir / "adapter"
    model.save_pretrained(str(adapter_path))
    merged_path = write_merged(model, tokenizer, Path(spec.base_model_path), output_dir / "merged")
    return TrainingResult(
        merged_model_path=str(merged_path), adapter_path=str(adapter_path),
        trained_tokens=position.tokens, train_loss=position.last_loss, valid_loss=valid_loss,
        steps=total_steps,
    )
