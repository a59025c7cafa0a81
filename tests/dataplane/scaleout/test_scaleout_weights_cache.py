"""The load-ready layout: round trip, zero-copy load, and the same greedy tokens as from disk."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dataplane.flowserve import weights_cache as wc
from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.models import load_model
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.scaleout.dram_cache import DramCache

KV_BYTES = 1 << 20
PROMPTS = [[1, 2, 3, 4, 5], [7, 7, 7], list(range(20, 60))]


def write(model_dir: Path, root: Path, dtype: torch.dtype) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = wc.load_ready_tensors(model_dir, dtype)
    entry = wc.entry_dir(root, model_dir, dtype)
    wc.write_entry(tensors, entry, model=str(model_dir))
    return entry, tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entry_round_trip(tiny_dir: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    entry, tensors = write(tiny_dir, tmp_path, dtype)
    index = json.loads((entry / wc.INDEX_FILE).read_text())
    assert index["nbytes"] == (entry / wc.DATA_FILE).stat().st_size
    assert all(spec["offset"] % wc.ALIGN == 0 for spec in index["tensors"].values())
    # The engine's layout, not the checkpoint's: fused q/k/v, and no lm_head (tied).
    assert "layers.0.self_attn.qkv_proj.weight" in tensors
    assert not any(name.startswith("lm_head") for name in tensors)
    mapped = wc.map_entry(entry)
    assert mapped is not None
    assert list(mapped.tensors) == list(tensors)
    for name, tensor in tensors.items():
        assert mapped.tensors[name].dtype == dtype
        assert torch.equal(mapped.tensors[name], tensor), name


def test_a_model_from_the_mapping_uses_its_pages(tiny_dir: Path, tmp_path: Path) -> None:
    entry, _ = write(tiny_dir, tmp_path, torch.float32)
    mapped = wc.map_entry(entry)
    assert mapped is not None
    base = mapped.tensors["embed_tokens.weight"].untyped_storage().data_ptr()
    model, _ = load_model(tiny_dir, torch.float32, torch.device("cpu"), ready=mapped.tensors)
    for name, param in model.named_parameters():
        assert param.untyped_storage().data_ptr() == base, f"{name} was copied"
    assert model.lm_head is None  # tied: logits use the mapped embedding


@pytest.mark.parametrize("model", ["tiny_dir", "small_dir"])  # tied and untied lm_head
def test_greedy_tokens_from_the_cache_equal_those_from_disk(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model_dir: Path = request.getfixturevalue(model)
    DramCache(tmp_path).preload(model_dir)
    config = EngineConfig(str(model_dir), kv_cache_bytes=KV_BYTES, max_model_len=128)
    disk = Engine(config)
    cached = Engine(dataclasses.replace(config, weights_cache=str(tmp_path)))
    assert (disk.weights.source, cached.weights.source) == ("disk", "dram_cache")
    assert greedy(cached) == greedy(disk)


def test_a_cache_miss_reads_the_folder(tiny_dir: Path, tmp_path: Path) -> None:
    config = EngineConfig(str(tiny_dir), kv_cache_bytes=KV_BYTES, weights_cache=str(tmp_path))
    assert Engine(config).weights.source == "disk"


def test_the_entry_name_follows_the_folder_and_dtype(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    before = wc.entry_name(folder, torch.float32)
    assert wc.entry_name(folder, torch.float32) == before
    assert wc.entry_name(folder, torch.bfloat16) != before
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert wc.entry_name(folder, torch.float32) != before


def greedy(engine: Engine) -> list[list[int]]:
    outputs: dict[str, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        engine.add_request(str(i), prompt, params)
        outputs[str(i)] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_id is not None:
                outputs[out.request_id].append(out.new_token_id)
    return [outputs[str(i)] for i in range(len(PROMPTS))]
