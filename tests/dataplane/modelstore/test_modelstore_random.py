from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dataplane.modelstore import (
    PRESETS,
    DestinationExists,
    ModelStoreError,
    UnknownPreset,
    create_random,
    inspect_folder,
)
from dataplane.modelstore import random_model as random_model_module
from dataplane.modelstore.tokenizer_build import TokenIds
from dataplane.modelstore.weights import INDEX_FILE, plan_shards, tensor_specs, write_weights


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tiny_loads_and_generates_greedily(tiny_model: Path) -> None:
    model, loading = AutoModelForCausalLM.from_pretrained(tiny_model, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert model.config.model_type == "llama"
    assert model.config.tie_word_embeddings
    assert model.num_parameters() == inspect_folder(tiny_model).num_parameters
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt"
    )
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    first = model.generate(**prompt, **kwargs)
    second = model.generate(**prompt, **kwargs)
    assert first.shape[1] == prompt["input_ids"].shape[1] + 6
    assert torch.equal(first, second)


def test_tokenizer_round_trips_text(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "The capital of France is Paris.  Spaces, tabs\tand 東京 😀 stay intact!\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    config = json.loads((tiny_model / "config.json").read_text())
    assert max(ids) < config["vocab_size"]
    assert len(tokenizer) <= config["vocab_size"]


def test_special_tokens_match_config(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = json.loads((tiny_model / "config.json").read_text())
    generation = json.loads((tiny_model / "generation_config.json").read_text())
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<|endoftext|>"
    assert config["eos_token_id"] == generation["eos_token_id"] == tokenizer.eos_token_id
    assert config["bos_token_id"] == generation["bos_token_id"] == tokenizer.bos_token_id
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(token)) == 1


def test_chat_template_is_chatml(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert encoded["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_same_seed_gives_same_bytes(tmp_path: Path) -> None:
    first = create_random(tmp_path / "a", "tiny", seed=7)
    second = create_random(tmp_path / "b", "tiny", seed=7)
    other = create_random(tmp_path / "c", "tiny", seed=8)
    assert _files(first) == _files(second)
    assert _files(first)["model.safetensors"] != _files(other)["model.safetensors"]
    assert _files(first)["tokenizer.json"] == _files(other)["tokenizer.json"]


def test_bfloat16_weights(tmp_path: Path) -> None:
    folder = create_random(tmp_path / "bf16", "tiny", dtype="bfloat16")
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16


def test_small_preset_is_untied_with_padded_vocab(tmp_path: Path) -> None:
    folder = create_random(tmp_path / "small", "small")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # The bundled corpus cannot fill 2048 merges; the model's vocab is padded beyond it.
    assert len(tokenizer) < model.config.vocab_size == 2048


def test_progress_reports_every_parameter(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    create_random(tmp_path / "p", "tiny", progress=lambda *c: calls.append(c))
    weights = [c for c in calls if c[0] == "weights"]
    assert weights[0][1] == 0
    assert weights[-1][1] == weights[-1][2] == inspect_folder(tmp_path / "p").num_parameters
    assert ("tokenizer", 1, 1) in calls


def test_unknown_preset_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(UnknownPreset) as excinfo:
        create_random(tmp_path / "x", "huge")
    assert isinstance(excinfo.value, ModelStoreError)
    for name in PRESETS:
        assert name in str(excinfo.value)
    assert not (tmp_path / "x").exists()


def test_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="float8"):
        create_random(tmp_path / "x", "tiny", dtype="float8")


def test_existing_destination_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(DestinationExists):
        create_random(dest, "tiny")
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_empty_destination_directory_is_used(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    create_random(dest, "tiny")
    assert (dest / "model.safetensors").is_file()


def test_failure_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(random_model_module, "_write_configs", fail)
    with pytest.raises(RuntimeError):
        create_random(tmp_path / "m", "tiny")
    assert list(tmp_path.iterdir()) == []


def test_sharded_weights_match_single_file(tmp_path: Path, tiny_model: Path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((tiny_model / name).read_bytes())
    write_weights(sharded, PRESETS["tiny"], seed=0, dtype=torch.float32, max_shard_bytes=64 * 1024)
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    single = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    split = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert single.keys() == split.keys()
    assert all(torch.equal(single[k], split[k]) for k in single)
    assert inspect_folder(sharded).num_parameters == inspect_folder(tiny_model).num_parameters


@pytest.mark.parametrize(
    ("preset", "num_parameters"),
    [
        ("smollm2-135m", 134_515_008),  # what the real SmolLM2-135M holds
        ("llama-1b", 1_235_814_400),  # Llama-3.2-1B
        ("llama-8b", 8_030_261_248),  # Llama-3-8B
    ],
)
def test_large_presets_have_real_shapes(preset: str, num_parameters: int) -> None:
    specs = tensor_specs(PRESETS[preset])
    assert sum(s.numel for s in specs) == num_parameters


def test_large_presets_shard_to_bound_memory() -> None:
    shards = plan_shards(tensor_specs(PRESETS["llama-8b"]), itemsize=2)
    assert len(shards) == 4
    assert plan_shards(tensor_specs(PRESETS["llama-1b"]), itemsize=2)[0].filename == (
        "model.safetensors"
    )


def test_presets_are_consistent() -> None:
    for preset in PRESETS.values():
        assert preset.hidden_size % preset.num_attention_heads == 0
        assert preset.num_attention_heads % preset.num_key_value_heads == 0
        assert preset.vocab_size >= 512


def test_large_preset_config(tmp_path: Path) -> None:
    # Only the configs: the 1B weights take a minute to write.
    ids = TokenIds(bos=0, eos=2, pad=0, vocab_size=640)
    random_model_module._write_configs(tmp_path, PRESETS["llama-1b"], ids, "bfloat16")
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (2048, 16, 128256)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id) == (0, 2)


def test_importing_the_package_does_not_import_torch() -> None:
    # The CLI imports the package for every command; torch costs seconds.
    code = "import sys, dataplane.modelstore; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
