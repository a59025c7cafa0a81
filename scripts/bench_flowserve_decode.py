"""Decode and prefill step time of FlowServe's Llama over the paged cache vs transformers' model.

    .venv/bin/python scripts/bench_flowserve_decode.py                 # SmolLM2-135M shape, CPU
    .venv/bin/python scripts/bench_flowserve_decode.py --device cuda --dtype bfloat16

A decode step is `batch` sequences of `context` cached tokens each adding one token: ours builds
the attention metadata, runs the forward pass and the logits of the sampling rows; transformers'
runs one forward with a DynamicCache of the same length (cropped back after each step). Random
weights: only the time means anything.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from dataplane.flowserve.attention import AttentionMetadata
from dataplane.flowserve.config import DTYPES
from dataplane.flowserve.kv_cache import allocate_kv_cache
from dataplane.flowserve.models import load_model
from dataplane.modelstore import create_random


def timed(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    """Median seconds of `steps` calls after two warm-up calls."""
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model folder (default: a random preset)")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--prefill", type=int, default=512, help="tokens per prefill sequence")
    parser.add_argument("--prefill-batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or create_random(Path(tmp) / "model", args.preset)
        model, config = load_model(path, dtype, device)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
        hf.eval()  # type: ignore[no-untyped-call]
    print(
        f"{args.preset if args.model is None else args.model}: {config.num_hidden_layers} "
        f"layers, hidden {config.hidden_size}, heads {config.num_attention_heads}/"
        f"{config.num_key_value_heads}; {device} {args.dtype}, {torch.get_num_threads()} threads"
    )

    batch, context, block_size = args.batch, args.context, args.block_size
    blocks_per_seq = -(-(context + 1) // block_size)
    num_blocks = max(batch * blocks_per_seq, args.prefill_batch * -(-args.prefill // block_size))
    caches = allocate_kv_cache(config, num_blocks + 1, block_size, dtype, device)
    ids = list(range(num_blocks + 1))
    random.Random(0).shuffle(ids)  # scattered blocks, as after a while of serving
    tables = [ids[b * blocks_per_seq : (b + 1) * blocks_per_seq] for b in range(batch)]
    input_ids = torch.randint(config.vocab_size, (batch,), device=device)

    def ours_decode() -> torch.Tensor:
        meta = AttentionMetadata.build(
            query_lens=[1] * batch,
            context_lens=[context + 1] * batch,
            block_tables=tables,
            block_size=block_size,
            device=device,
            dtype=dtype,
        )
        hidden = model(input_ids, meta.positions, caches, meta)
        return model.compute_logits(hidden)

    cache = DynamicCache(config=hf.config)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    for layer in range(config.num_hidden_layers):
        k = torch.randn(shape, dtype=dtype, device=device)
        cache.update(k, torch.randn_like(k), layer)
    position_ids = torch.full((batch, 1), context, device=device)

    def hf_decode() -> torch.Tensor:
        out = hf(
            input_ids=input_ids[:, None],
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.crop(-1)  # back to `context` tokens for the next step
        return out.logits  # type: ignore[no-any-return]

    ours = timed(ours_decode, device, args.steps)
    theirs = timed(hf_decode, device, args.steps)
    print(
        f"decode {batch} seqs x {context} context: ours {ours * 1e3:.1f} ms, "
        f"transformers {theirs * 1e3:.1f} ms ({theirs / ours:.2f}x), "
        f"{batch / ours:.0f} tokens/s ours"
    )

    n, length = args.prefill_batch, args.prefill
    prompt_ids = torch.randint(config.vocab_size, (n, length), device=device)
    prefill_tables = [
        ids[b * -(-length // block_size) :][: -(-length // block_size)] for b in range(n)
    ]

    def ours_prefill() -> torch.Tensor:
        meta = AttentionMetadata.build(
            query_lens=[length] * n,
            context_lens=[length] * n,
            block_tables=prefill_tables,
            block_size=block_size,
            device=device,
            dtype=dtype,
        )
        hidden = model(prompt_ids.reshape(-1), meta.positions, caches, meta)
        last = torch.tensor(meta.query_start_loc[1:], device=device) - 1
        return model.compute_logits(hidden[last])

    def hf_prefill() -> torch.Tensor:
        return hf(input_ids=prompt_ids, use_cache=False, logits_to_keep=1).logits  # type: ignore[no-any-return]

    ours = timed(ours_prefill, device, max(3, args.steps // 3))
    theirs = timed(hf_prefill, device, max(3, args.steps // 3))
    print(
        f"prefill {n} seqs x {length} tokens: ours {ours * 1e3:.1f} ms, "
        f"transformers {theirs * 1e3:.1f} ms ({theirs / ours:.2f}x), "
        f"{n * length / ours:.0f} tokens/s ours"
    )


if __name__ == "__main__":
    main()
