"""Checkpoints: output_dir/checkpoints/step-N/ holds the adapter (peft's save_pretrained) and
trainer_state.pt (optimizer, scheduler, RNG state and the position). Each is written under a
temporary name and renamed, so a folder named step-N is always whole."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"


@dataclass(slots=True)
class Position:
    step: int  # steps done
    tokens: int  # trained tokens so far
    last_loss: float


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    dest: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
) -> Path:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / ADAPTER_DIR))
    torch.save(
        {
            "step": position.step,
            "tokens": position.tokens,
            "last_loss": position.last_loss,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / STATE_FILE,
    )
    if dest.exists():  # a rerun of the same step after a resume
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def load_checkpoint(
    path: str | Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Position:
    """Restore the adapter weights, optimizer, scheduler and RNG; return where the run was."""
    path = Path(path)
    weights = path / ADAPTER_DIR / "adapter_model.safetensors"
    if not weights.is_file() or not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a checkpoint (no {weights.name} or {STATE_FILE})")
    device = next(model.parameters()).device
    result = set_peft_model_state_dict(model, load_file(str(weights), device=str(device)))
    unexpected: list[str] = getattr(result, "unexpected_keys", [])  # torch's namedtuple, untyped
    if unexpected:
        raise ValueError(f"{path}: the adapter does not fit this model: {unexpected[:3]}")
    state = torch.load(path / STATE_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
    return Position(int(state["step"]), int(state["tokens"]), float(state["last_loss"]))
