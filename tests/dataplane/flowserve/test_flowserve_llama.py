"""Our Llama over the paged cache against transformers' model on the same folder (float32)."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers import (
    LlamaForCausalLM as HFLlama,
)

from dataplane.flowserve.attention import AttentionMetadata
from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.kv_cache import allocate_kv_cache
from dataplane.flowserve.models import LlamaForCausalLM, ModelConfig, load_model
from dataplane.modelstore import create_random
from dataplane.modelstore.presets import get_preset
from dataplane.modelstore.weights import write_weights

CPU = torch.device("cpu")
ATOL = 1e-4


class PagedRunner:
    """A test-local stand-in for the model runner: sequences by id, block tables drawn from a
    shuffled free list so that no sequence's blocks are contiguous."""

    def __init__(self, model: LlamaForCausalLM, block_size: int = 4, num_blocks: int = 128) -> None:
        self.model = model
        self.block_size = block_size
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.caches = allocate_kv_cache(
            model.config, num_blocks, block_size, self.dtype, self.device
        )
        self.free = list(range(num_blocks))
        random.Random(block_size).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.num_cached: dict[str, int] = {}

    @torch.inference_mode()
    def step(self, work: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """One forward over every (seq, new token ids); the logits of each new token, per seq."""
        context_lens = []
        for seq_id, token_ids in work:
            context_len = self.num_cached.get(seq_id, 0) + len(token_ids)
            table = self.tables.setdefault(seq_id, [])
            while len(table) * self.block_size < context_len:
                table.append(self.free.pop())
            self.num_cached[seq_id] = context_len
            context_lens.append(context_len)
        meta = AttentionMetadata.build(
            query_lens=[len(ids) for _, ids in work],
            context_lens=context_lens,
            block_tables=[self.tables[seq_id] for seq_id, _ in work],
            block_size=self.block_size,
            device=self.device,
            dtype=self.dtype,
        )
        input_ids = torch.tensor([t for _, ids in work for t in ids], device=self.device)
        hidden = self.model(input_ids, meta.positions, self.caches, meta)  # [T, hidden]
        logits = self.model.compute_logits(hidden)  # [T, vocab]
        starts = meta.query_start_loc
        return [logits[starts[b] : starts[b + 1]] for b in range(len(work))]


@torch.inference_mode()
def hf_logits(hf: PreTrainedModel, token_ids: list[int]) -> torch.Tensor:  # [len, vocab]
    return hf(torch.tensor([token_ids], device=hf.device)).logits[0]  # type: ignore[no-any-return]


def prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


# --- model folders -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_random(tmp_path_factory.mktemp("llama") / "small", "small", seed=2)


def _save_randomized(model: PreTrainedModel, dest: Path) -> Path:
    """Every parameter random (biases and norms too), so that a mapping mistake shows."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            param.copy_(noise + 1 if "norm" in name else noise)
    model.save_pretrained(dest)
    return dest


TINY_SHAPE: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = Qwen2Config(
        **TINY_SHAPE,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    torch.manual_seed(0)
    return _save_randomized(Qwen2ForCausalLM(config), tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def llama3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # original_max_position_embeddings 64 puts some of head_dim 16's frequencies in each band
    # (kept, interpolated, stretched); the biases exercise Llama's attention_bias/mlp_bias.
    config = LlamaConfig(
        **TINY_SHAPE,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return _save_randomized(HFLlama(config), tmp_path_factory.mktemp("llama3"))


FOLDERS = ["tiny_model_dir", "small_model_dir", "qwen2_model_dir", "llama3_model_dir"]


@pytest.fixture(scope="session", params=FOLDERS)
def pair(request: pytest.FixtureRequest) -> tuple[LlamaForCausalLM, PreTrainedModel]:
    """Ours and transformers', loaded from the same folder."""
    path = request.getfixturevalue(request.param)
    model, _ = load_model(path, torch.float32, CPU)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, hf.eval()  # type: ignore[no-untyped-call]


# --- equality with transformers ------------------------------------------------------------


def test_prefill_logits_match_hf(pair: tuple[LlamaForCausalLM, PreTrainedModel]) -> None:
    model, hf = pair
    batch = prompts(model.config.vocab_size, [1, 7, 23, 40])
    alone = [PagedRunner(model).step([("s", ids)])[0] for ids in batch]
    together = PagedRunner(model).step([(f"s{i}", ids) for i, ids in enumerate(batch)])
    for ids, a, t in zip(batch, alone, together, strict=True):
        expected = hf_logits(hf, ids)
        torch.testing.assert_close(a, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(t, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("block_size", [4, 16])
def test_token_by_token_decode_matches_hf(
    pair: tuple[LlamaForCausalLM, PreTrainedModel], block_size: int
) -> None:
    model, hf = pair
    prompt, continuation = prompts(model.config.vocab_size, [5, 20], seed=1)
    expected = hf_logits(hf, prompt + continuation)  # causal: row i is the prefix's last row
    runner = PagedRunner(model, block_size=block_size)
    runner.step([("s", prompt)])
    for i, token in enumerate(continuation):
        (logits,) = runner.step([("s", [token])])
        torch.testing.assert_close(logits[-1], expected[len(prompt) + i], atol=ATOL, rtol=0)


def test_greedy_generation_matches_hf_generate(
    pair: tuple[LlamaForCausalLM, PreTrainedModel],
) -> None:
    model, hf = pair
    eos = set(model.config.eos_token_ids)
    batch = prompts(model.config.vocab_size, [4, 11, 2], seed=2)
    runner = PagedRunner(model)
    outputs: dict[str, list[int]] = {f"s{i}": [] for i in range(len(batch))}
    work = [(f"s{i}", ids) for i, ids in enumerate(batch)]
    while work:
        logits = runner.step(work)
        next_work = []
        for (seq_id, _), rows in zip(work, logits, strict=True):
            token = int(rows[-1].argmax())
            outputs[seq_id].append(token)
            if token not in eos and len(outputs[seq_id]) < 20:
                next_work.append((seq_id, [token]))
        work = next_work
    for i, ids in enumerate(batch):
        with torch.inference_mode():
            generated = hf.generate(  # type: ignore[operator]
                torch.tensor([ids]), max_new_tokens=20, do_sample=False
            )
        assert outputs[f"s{i}"] == generated[0, len(ids) :].tolist()


def test_mixed_batch_equals_each_sequence_alone(small_model_dir: Path) -> None:
    """Two prefills (one a chunk continuing an earlier chunk) and three decodes in one
    forward, decodes interleaved with the prefills, give what each gives alone."""
    model, _ = load_model(small_model_dir, torch.float32, CPU)
    vocab = model.config.vocab_size
    chunked, fresh, d1, d2, d3 = prompts(vocab, [15, 9, 6, 13, 21], seed=3)
    decode_tokens = prompts(vocab, [1, 1, 1], seed=4)

    mixed = PagedRunner(model, block_size=4)
    mixed.step([("chunked", chunked[:8])])
    mixed.step([("d1", d1), ("d2", d2), ("d3", d3)])
    mixed_logits = mixed.step(
        [
            ("d1", decode_tokens[0]),
            ("chunked", chunked[8:]),
            ("d2", decode_tokens[1]),
            ("fresh", fresh),
            ("d3", decode_tokens[2]),
        ]
    )

    alone: list[torch.Tensor] = []
    first = PagedRunner(model, block_size=16)
    first.step([("chunked", chunked[:8])])
    alone_chunked = first.step([("chunked", chunked[8:])])[0]
    for prompt, token in zip([d1, d2, d3], decode_tokens, strict=True):
        runner = PagedRunner(model, block_size=16)
        runner.step([("s", prompt)])
        alone.append(runner.step([("s", token)])[0])
    alone_fresh = PagedRunner(model, block_size=16).step([("s", fresh)])[0]

    expected = [alone[0], alone_chunked, alone[1], alone_fresh, alone[2]]
    for got, want in zip(mixed_logits, expected, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# --- loading -------------------------------------------------------------------------------


def test_load_reads_config(small_model_dir: Path, qwen2_model_dir: Path) -> None:
    _, small = load_model(small_model_dir, torch.float32, CPU)
    assert (small.model_type, small.num_key_value_heads, small.head_dim) == ("llama", 4, 32)
    assert not small.tie_word_embeddings and not small.attention_bias
    _, qwen2 = load_model(qwen2_model_dir, torch.float32, CPU)
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.tie_word_embeddings
    assert (qwen2.rope_theta, qwen2.eos_token_ids, qwen2.sliding_window) == (1e6, (2,), None)


def test_load_in_bfloat16(small_model_dir: Path) -> None:
    model, _ = load_model(small_model_dir, torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    runner = PagedRunner(model)
    logits = runner.step([("a", [1, 2, 3]), ("b", [4])])
    runner.step([("a", [5]), ("b", [6, 7])])
    assert all(rows.dtype == torch.bfloat16 and torch.isfinite(rows).all() for rows in logits)


def test_sharded_folder_loads_like_one_file(small_model_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(small_model_dir / "config.json", sharded)
    write_weights(
        sharded, get_preset("small"), seed=2, dtype=torch.float32, max_shard_bytes=1 << 20
    )
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    # Files an index does not name (such as Mistral's consolidated export) are not read.
    save_file({"junk": torch.zeros(1)}, sharded / "consolidated.safetensors")
    one, _ = load_model(small_model_dir, torch.float32, CPU)
    many, _ = load_model(sharded, torch.float32, CPU)
    for (name, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def _edited_copy(src: Path, dest: Path, edit: Mapping[str, torch.Tensor | None]) -> Path:
    dest.mkdir()
    shutil.copy(src / "config.json", dest)
    tensors = load_file(src / "model.safetensors")
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, dest / "model.safetensors")
    return dest


def test_missing_tensor_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = _edited_copy(
        tiny_model_dir, tmp_path / "m", {"model.layers.1.self_attn.k_proj.weight": None}
    )
    with pytest.raises(ConfigError, match=r"missing tensors model\.layers\.1\.self_attn\.k_proj"):
        load_model(path, torch.float32, CPU)


def test_unexpected_tensor_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = _edited_copy(tiny_model_dir, tmp_path / "u", {"model.extra.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"unexpected tensors model\.extra\.weight"):
        load_model(path, torch.float32, CPU)


def test_wrong_shape_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = {"model.norm.weight": torch.ones(3)}
    path = _edited_copy(tiny_model_dir, tmp_path / "s", bad)
    with pytest.raises(ConfigError, match=r"model\.norm\.weight has shape \(3,\)"):
        load_model(path, torch.float32, CPU)


def test_folder_without_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model_dir / "config.json", tmp_path)
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        load_model(tmp_path, torch.float32, CPU)


# --- config parsing ------------------------------------------------------------------------

BASE: dict[str, Any] = {"model_type": "llama", **TINY_SHAPE}


def test_config_reads_legacy_rope_spelling() -> None:
    config = ModelConfig.from_dict(
        {
            **BASE,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "eos_token_id": [128001, 128009],
            "head_dim": 32,
        }
    )
    assert config.rope_theta == 500000.0
    assert config.rope_scaling is not None and config.rope_scaling.factor == 32.0
    assert config.eos_token_ids == (128001, 128009)
    assert config.head_dim == 32 and config.q_size == 128 and config.kv_size == 64


def test_config_mistral_keeps_its_sliding_window() -> None:
    config = ModelConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert config.sliding_window == 4096 and not config.attention_bias


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"hidden_size": None}, "positive integer hidden_size"),
    ],
)
def test_config_rejects(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**BASE, **change})


def test_config_from_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_folder(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_hf(small_model_dir: Path) -> None:
    cuda = torch.device("cuda")
    model, _ = load_model(small_model_dir, torch.float32, cuda)
    hf = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32, device_map=cuda)
    batch = prompts(model.config.vocab_size, [9, 30, 1], seed=5)
    runner = PagedRunner(model, block_size=16)
    first = runner.step([(f"s{i}", ids) for i, ids in enumerate(batch)])
    second = runner.step([(f"s{i}", [7]) for i in range(len(batch))])
    for ids, a, b in zip(batch, first, second, strict=True):
        expected = hf_logits(hf, ids + [7])
        torch.testing.assert_close(a, expected[: len(ids)], atol=1e-3, rtol=0)
        torch.testing.assert_close(b[-1], expected[-1], atol=1e-3, rtol=0)
    bf16, _ = load_model(small_model_dir, torch.bfloat16, cuda)
    logits = PagedRunner(bf16, block_size=16).step([("a", batch[0]), ("b", batch[1])])
    assert all(torch.isfinite(rows).all() for rows in logits)
