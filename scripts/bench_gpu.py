"""`bench_engine.py --device cuda`: FlowServe on a GPU against its bound and against Hugging Face.

    python scripts/bench_engine.py --device cuda --preset llama-1b --json gpu.json

In one run, on one model (random weights of the preset's shape, bf16):

    roofline       the device's copy bandwidth (a 2 GiB device-to-device copy, bytes read plus
                   written, median of 10) and the batch-1 decode bound it gives: bandwidth / bytes
                   of weights one decode step reads (every parameter once; a tied embedding is
                   read by the logits)
    batch-1        one request (a 128-token prompt, 512 new tokens) alone in the engine: decode
                   tok/s = (tokens - 1) / (last token - first token)
    flowserve@C    C requests in flight in this process, each finished one replaced at once by the
                   next of the seeded workload (max(64, 2C) requests)
    hf-static-B    `generate` on left-padded static batches of B (2 batches' worth, or all), the
                   peer; a batch runs until its longest request is done

TTFT, ITL and tok/s as in bench_engine.py.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from typing import Any

import torch
from bench_runs import Run, drain, hf_generate, run_closed_loop, run_hf_static, warmup_prompt
from transformers import AutoModelForCausalLM
from workload import WorkItem

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.sampling_params import SamplingParams

TARGET_ROOFLINE = 0.70
TARGET_TOK_S = 15_000.0
TARGET_VS_HF = 15.0
TARGET_CONCURRENCY = 256
BATCH1_PROMPT = 128
BATCH1_TOKENS = 512


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def weight_bytes(engine: Engine) -> int:
    model = engine._runner.model
    return sum(p.numel() * p.element_size() for p in model.parameters())


def batch1_decode(engine: Engine, items: list[WorkItem]) -> dict[str, float]:
    token = items[0].prompt_token_ids[0]
    prompt = [token] * BATCH1_PROMPT
    params = SamplingParams(max_tokens=BATCH1_TOKENS, temperature=0.0, ignore_eos=True)
    drain(engine, {"b1-warmup": WorkItem(tuple(prompt), 16)})
    engine.add_request("b1", prompt, params)
    times: list[float] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_token_id is not None:
                times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "tokens": len(times),
        "tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "itl_p50_ms": statistics.median(gaps) * 1e3,
    }


def report(run: Run) -> None:
    s = run.summary()
    print(f"  {run.system}: {s['output_tok_s']:.0f} tok/s in {run.wall_s:.1f} s", file=sys.stderr)


def bench_cuda(args: Any, model: str, items: list[WorkItem]) -> dict[str, Any]:
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    runs: list[Run] = []
    if "hf-static" not in args.skip:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
        pad_id = hf.generation_config.pad_token_id or hf.generation_config.eos_token_id or 0
        pad_id = pad_id[0] if isinstance(pad_id, list) else int(pad_id)
        hf_generate(hf, [warmup_prompt(items)], pad_id)
        for size in args.batch_sizes:
            runs.append(run_hf_static(hf, items[: 2 * size], size, pad_id))
            report(runs[-1])
        del hf
        gc.collect()
        torch.cuda.empty_cache()

    bandwidth = copy_bandwidth(device)
    start = time.perf_counter()
    engine = Engine(
        EngineConfig(
            model,
            dtype=args.dtype,
            device="cuda",
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enforce_eager=args.eager,
        )
    )
    startup_s = time.perf_counter() - start
    print(f"  engine ready in {startup_s:.1f} s: {engine.describe_kv_cache()}", file=sys.stderr)
    weights = weight_bytes(engine)
    b1 = batch1_decode(engine, items)
    roofline_tok_s = bandwidth / weights
    print(
        f"  batch-1: {b1['tok_s']:.0f} tok/s, roofline {roofline_tok_s:.0f} tok/s",
        file=sys.stderr,
    )
    # A discarded closed loop at the largest concurrency first, so that every prefill and
    # mixed-step shape is compiled here, not inside whichever run comes first: the workload's
    # prompts reversed (the same lengths; nothing the prefix cache could serve later).
    top = max(args.concurrency)
    warm = [WorkItem(tuple(reversed(i.prompt_token_ids)), min(i.max_tokens, 32)) for i in items]
    run_closed_loop(engine, warm[: max(64, top)], top)
    for concurrency in args.concurrency:
        subset = items[: max(64, 2 * concurrency)]
        runs.append(run_closed_loop(engine, subset, concurrency))
        report(runs[-1])
    summaries = {run.system: run.summary() for run in runs}
    hf_best = max(
        (s["output_tok_s"] for n, s in summaries.items() if n.startswith("hf-static-")),
        default=None,
    )
    ours = summaries.get(f"flowserve@{TARGET_CONCURRENCY}")
    ours_tok_s = ours["output_tok_s"] if ours else None
    ratio = ours_tok_s / hf_best if ours_tok_s is not None and hf_best else None
    share = b1["tok_s"] / roofline_tok_s
    return {
        "device": torch.cuda.get_device_name(device),
        "engine_startup_s": startup_s,
        "kv_cache": engine.describe_kv_cache(),
        "eager": args.eager,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weights,
        "roofline_tok_s": roofline_tok_s,
        "batch1": b1,
        "systems": summaries,
        "targets": [
            _target(
                "batch-1 decode / roofline", share, f">= {TARGET_ROOFLINE:.0%}", TARGET_ROOFLINE
            ),
            _target(
                f"flowserve@{TARGET_CONCURRENCY} output tok/s",
                ours_tok_s,
                f">= {TARGET_TOK_S:.0f}",
                TARGET_TOK_S,
            ),
            _target(
                f"flowserve@{TARGET_CONCURRENCY} / best hf-static tok/s",
                ratio,
                f">= {TARGET_VS_HF:.0f}x",
                TARGET_VS_HF,
            ),
        ],
    }


def _target(name: str, value: float | None, text: str, bound: float) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "target": text,
        "passed": None if value is None else value >= bound,
    }


def render_cuda(result: dict[str, Any]) -> list[str]:
    g = result["gpu"]
    b1 = g["batch1"]
    lines = [
        f"device: {g['device']}; engine start-up {g['engine_startup_s']:.1f} s"
        f"{' (eager)' if g['eager'] else ''}; {g['kv_cache']}",
        f"roofline: copy bandwidth {g['copy_bandwidth_gb_s']:.0f} GB/s (read + write), weights "
        f"{g['weight_bytes'] / 1e9:.2f} GB -> batch-1 bound {g['roofline_tok_s']:.0f} tok/s",
        f"batch-1 decode: {b1['tok_s']:.0f} tok/s ({b1['tok_s'] / g['roofline_tok_s']:.0%} of the "
        f"roofline), ITL p50 {b1['itl_p50_ms']:.2f} ms over {b1['tokens']} tokens",
        "",
        "| system | requests | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) "
        "| ITL p99 (ms) | e2e p50 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in g["systems"].values():
        lines.append(
            f"| {s['system']} | {s['num_requests']} | {s['output_tok_s']:.0f} "
            f"| {_f(s['ttft_p50_s'])} | {_f(s['ttft_p99_s'])} | {_f(s['itl_p50_s'], 1e3, 2)} "
            f"| {_f(s['itl_p99_s'], 1e3, 2)} | {_f(s['e2e_p50_s'])} |"
        )
    lines += ["", "| target | value | bound | |", "|---|---:|---|---|"]
    for t in g["targets"]:
        mark = {True: "PASS", False: "FAIL", None: ""}[t["passed"]]
        lines.append(f"| {t['name']} | {_f(t['value'], digits=2)} | {t['target']} | {mark} |")
    return lines


def _f(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"
