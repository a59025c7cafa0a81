"""FlowServe against Hugging Face `generate`, on one seeded workload, in one run.

    python scripts/bench_engine.py                      # SmolLM2 from $DEEPFLOW_HOME/models
    python scripts/bench_engine.py --preset tiny        # a random model, for a smoke run
    python scripts/bench_engine.py --quick --json out.json
    python scripts/bench_engine.py --device cuda --preset llama-1b   # the GPU run: bench_gpu.py

Systems, each on the same workload (or, for hf-seq and flowserve-server@1, the same evenly spread
subset of it), the same model
folder, greedy, with ignore_eos (every request produces exactly its max_tokens):

    hf-seq              `generate` one request at a time
    hf-static-B         `generate` on left-padded batches of B in workload order; a batch runs
                        until its longest request is done (only each request's own tokens count)
    flowserve-offline   the Engine in this process, every request added at t0
    flowserve-server@C  the real instance server process, a closed-loop client with C workers

Latency. Offline runs (hf-static, flowserve-offline): every request arrives at t0, so TTFT =
first-token time - t0 (it includes waiting for earlier batches). Closed-loop runs (hf-seq, which is
a closed loop of one, and flowserve-server@C): a request arrives when its worker sends it. TTFT =
first token - arrival (server runs ramp up: worker k+1 starts once worker k has a first token,
unless --no-ramp-up starts all C at t0); ITL = gaps between a request's consecutive tokens,
pooled over requests; e2e = last token - arrival. On the server a delta carrying k tokens
spreads the gap since the previous token evenly over its k tokens (the first delta's tokens all
land at its arrival).
Output tok/s = output tokens of the run / wall time of the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import transformers
from bench_gpu import bench_cuda, render_cuda
from bench_runs import (
    BenchError,
    Run,
    hf_generate,
    run_hf_sequential,
    run_hf_static,
    run_offline,
    warmup_prompt,
)
from bench_server import run_server
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from workload import WorkItem, make_workload, spread_subset, summarize

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.modelstore import PRESETS, create_random

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("hf-seq", "hf-static", "offline", "server")
DEFAULT_MODEL = "smollm2-135m-instruct"
# The targets, on the 2-core machine with SmolLM2.
TARGET_VS_SEQ = 5.0
TARGET_VS_STATIC = 1.5
TARGET_TTFT_P99_S = 2.0
TARGET_CONCURRENCY = 32
TTFT_CONCURRENCY = 8

Row = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def report_progress(run: Run) -> None:
    s = run.summary()
    print(f"  {run.system}: {s['output_tok_s']:.1f} tok/s in {run.wall_s:.1f} s", file=sys.stderr)


def ratios(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's three targets, then two for context; a value is None where a system it needs
    was skipped, and `passed` None where there is no target or no value."""

    def tok_s(name: str) -> float | None:
        s = summaries.get(name)
        return s["output_tok_s"] if s else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def row(name: str, value: float | None, target: str = "", ok: bool | None = None) -> Row:
        return {"name": name, "value": value, "target": target, "passed": ok}

    static = [s["output_tok_s"] for n, s in summaries.items() if n.startswith("hf-static-")]
    best_static = max(static) if static else None
    server = tok_s(f"flowserve-server@{TARGET_CONCURRENCY}")
    offline = tok_s("flowserve-offline")
    vs_seq = ratio(server, tok_s("hf-seq"))
    vs_static = ratio(server, best_static)
    at_ttft = summaries.get(f"flowserve-server@{TTFT_CONCURRENCY}")
    ttft = at_ttft["ttft_p99_s"] if at_ttft else None
    c, c_ttft = TARGET_CONCURRENCY, TTFT_CONCURRENCY
    return [
        row(
            f"server@{c} / hf-seq tok/s",
            vs_seq,
            f">= {TARGET_VS_SEQ}x",
            None if vs_seq is None else vs_seq >= TARGET_VS_SEQ,
        ),
        row(
            f"server@{c} / best hf-static tok/s",
            vs_static,
            f">= {TARGET_VS_STATIC}x",
            None if vs_static is None else vs_static >= TARGET_VS_STATIC,
        ),
        row(
            f"server@{c_ttft} TTFT p99 (s)",
            ttft,
            f"< {TARGET_TTFT_P99_S} s",
            None if ttft is None else ttft < TARGET_TTFT_P99_S,
        ),
        row("offline / hf-seq tok/s", ratio(offline, tok_s("hf-seq"))),
        row("offline / best hf-static tok/s", ratio(offline, best_static)),
    ]


def fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def render(result: dict[str, Any]) -> str:
    if "gpu" in result:
        return render_gpu(result)
    m, w = result["machine"], result["workload"]
    lines = [
        f"FlowServe vs Hugging Face generate - {m['date']} - commit {m['commit']}",
        f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, device {m['device']}",
        f"model: {result['model']} ({m['dtype']}); workload: seed {w['seed']}, "
        f"{w['num_requests']} requests, mean prompt {w['mean_prompt_len']:.0f}, "
        f"mean output {w['mean_output_len']:.0f}, {w['num_shared_prefix']} with a shared "
        f"system prompt; hf-seq and server@1 on {w['hf_seq_requests']} of them, evenly spread "
        f"(mean prompt {w['hf_seq_mean_prompt_len']:.0f}, "
        f"mean output {w['hf_seq_mean_output_len']:.0f})",
        "",
        "| system | requests | output tok/s | TTFT p50 (s) | TTFT p99 (s) | ITL p50 (ms) "
        "| ITL p99 (ms) | e2e p50 (s) | prefix hit rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["systems"].values():
        failed = f" ({s['failures']} failed)" if s["failures"] else ""
        lines.append(
            f"| {s['system']} | {s['num_requests']}{failed} | {s['output_tok_s']:.1f} "
            f"| {fmt(s['ttft_p50_s'])} | {fmt(s['ttft_p99_s'])} | {fmt(s['itl_p50_s'], 1e3, 1)} "
            f"| {fmt(s['itl_p99_s'], 1e3, 1)} | {fmt(s['e2e_p50_s'])} "
            f"| {percent(s['prefix_hit_rate'])} |"
        )
    lines += ["", "| ratio | value | target | |", "|---|---:|---|---|"]
    for r in result["ratios"]:
        mark = {True: "PASS", False: "FAIL", None: ""}[r["passed"]]
        lines.append(f"| {r['name']} | {fmt(r['value'], digits=2)} | {r['target']} | {mark} |")
    if result["quick"]:
        lines.append("(--quick: a smoke run on a tiny model; the targets are SmolLM2's)")
    lines += ["", *LATENCY_NOTE]
    return "\n".join(lines)


def render_gpu(result: dict[str, Any]) -> str:
    m, w = result["machine"], result["workload"]
    lines = [
        f"FlowServe vs Hugging Face generate on a GPU - {m['date']} - commit {m['commit']}",
        f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']}, transformers "
        f"{m['transformers']}",
        f"model: {result['model']} ({m['dtype']}); workload: seed {w['seed']}, "
        f"{w['num_requests']} requests, mean prompt {w['mean_prompt_len']:.0f}, "
        f"mean output {w['mean_output_len']:.0f}, {w['num_shared_prefix']} with a shared "
        "system prompt",
        *render_cuda(result),
        "",
        *LATENCY_NOTE,
    ]
    return "\n".join(lines)


LATENCY_NOTE = (
    "Offline runs (hf-static-*, flowserve-offline): all requests arrive at t0; TTFT = first token"
    " - t0, including the wait for earlier batches.",
    "Closed-loop runs (hf-seq = a loop of one, flowserve-server@C = C workers): a request arrives"
    " when sent; TTFT = first token - arrival.",
    "Server runs ramp up unless --no-ramp-up: worker k+1 starts when worker k has its first token.",
    "ITL: gaps between consecutive tokens of a request, pooled; e2e: last token - arrival;"
    " output tok/s: output tokens / wall time of the run.",
)


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    def git(*cmd: str) -> str:
        try:
            out = subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "device": args.device,
        "dtype": args.dtype,
    }


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"need positive integers: {text!r}")
    return values


def system_list(text: str) -> set[str]:
    names = {v.strip() for v in text.split(",") if v.strip()}
    unknown = names - set(SYSTEMS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown systems {sorted(unknown)}; known: {SYSTEMS}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    home = Path(os.environ.get("DEEPFLOW_HOME") or Path.home() / ".deepflow").expanduser()
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--model", default=None, help=f"model folder (default: {home / 'models' / DEFAULT_MODEL})"
    )
    source.add_argument(
        "--preset", choices=sorted(PRESETS), help="write a random model of this shape and use it"
    )
    p.add_argument("--num-requests", type=int, default=None, help="default: 64, 512 on cuda")
    p.add_argument(
        "--hf-requests", type=int, default=16, help="requests hf-seq runs (a spread subset)"
    )
    p.add_argument(
        "--concurrency", type=int_list, default=None, help="default: 1,8,32,64; 16,64,256 on cuda"
    )
    p.add_argument(
        "--batch-sizes",
        type=int_list,
        default=None,
        help="hf-static batch sizes (default: 16,32; 16,64,256 on cuda)",
    )
    p.add_argument("--skip", type=system_list, default=set(), help=f"any of {','.join(SYSTEMS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--min-out", type=int, default=16)
    p.add_argument("--max-out", type=int, default=256)
    p.add_argument(
        "--max-num-seqs", type=int, default=None, help="engine slots (default: max concurrency)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="default: float32 on cpu, bfloat16 on cuda",
    )
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=4096, help="engine step budget (cuda)"
    )
    p.add_argument("--eager", action="store_true", help="no decode graphs (cuda)")
    p.add_argument(
        "--reuse-server",
        action="store_true",
        help="one server for every concurrency (faster; later levels hit earlier prompts' cache)",
    )
    p.add_argument(
        "--ramp-up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="server runs: start worker k+1 once worker k has a first token, instead of a"
        " burst of C requests at t0 (default: on)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every result here")
    p.add_argument("--quick", action="store_true", help="tiny preset, few short requests (tests)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if args.num_requests is None:
        args.num_requests = 512 if cuda else 64
    if args.concurrency is None:
        args.concurrency = [16, 64, 256] if cuda else [1, 8, 32, 64]
    if args.batch_sizes is None:
        args.batch_sizes = [16, 64, 256] if cuda else [16, 32]
    if args.dtype is None:
        args.dtype = "bfloat16" if cuda else "float32"
    if args.quick:
        if args.model is None:
            args.preset = args.preset or "tiny"
        args.num_requests, args.hf_requests = min(args.num_requests, 8), min(args.hf_requests, 2)
        args.max_prompt, args.min_out, args.max_out = 64, 4, 12
        args.reuse_server = True
    if args.model is None and args.preset is None:
        args.model = str(home / "models" / DEFAULT_MODEL)
    if args.model is not None and not Path(args.model).is_dir():
        p.error(f"no model folder at {args.model}: pass --model PATH or --preset NAME")
    args.max_num_seqs = args.max_num_seqs or max(args.concurrency)
    return args


def build_workload(args: argparse.Namespace, model: str) -> list[WorkItem]:
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    # A tokenizer may know more ids than the model's embedding has rows, or fewer.
    vocab_size = min(len(tokenizer), AutoConfig.from_pretrained(model).vocab_size)
    return make_workload(
        args.num_requests,
        args.seed,
        vocab_size,
        avoid_token_ids=tokenizer.all_special_ids,
        min_prompt=args.min_prompt,
        max_prompt=args.max_prompt,
        min_out=args.min_out,
        max_out=args.max_out,
        system_prompt_len=min(128, args.max_prompt // 3),
    )


def bench(args: argparse.Namespace, model: str, work_dir: Path) -> dict[str, Any]:
    items = build_workload(args, model)
    if args.device == "cuda":
        return {
            "machine": machine_info(args),
            "model": model if args.preset is None else f"random:{args.preset}",
            "quick": args.quick,
            "workload": asdict(summarize(items)) | {"seed": args.seed},
            "latency_definitions": list(LATENCY_NOTE),
            "gpu": bench_cuda(args, model, items),
        }
    hf_items = spread_subset(items, args.hf_requests)
    runs: list[Run] = []
    if not {"hf-seq", "hf-static"} <= args.skip:
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype))
        hf = hf.to(args.device).eval()
        pad_id = hf.generation_config.pad_token_id or hf.generation_config.eos_token_id or 0
        pad_id = pad_id[0] if isinstance(pad_id, list) else int(pad_id)
        hf_generate(hf, [warmup_prompt(items)], pad_id)
        if "hf-seq" not in args.skip:
            runs.append(run_hf_sequential(hf, hf_items, pad_id))
            report_progress(runs[-1])
        if "hf-static" not in args.skip:
            for size in args.batch_sizes:
                runs.append(run_hf_static(hf, items, size, pad_id))
                report_progress(runs[-1])
        del hf
        gc.collect()
    if "offline" not in args.skip:
        config = EngineConfig(
            model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs
        )
        engine = Engine(config)
        runs.append(run_offline(engine, items))
        report_progress(runs[-1])
        del engine
        gc.collect()
    if "server" not in args.skip:
        options = ["--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype]
        options += ["--device", args.device]
        log = work_dir / "server.log"
        # Concurrency 1 is a loop of one, like hf-seq: it runs hf-seq's requests, so the two
        # compare request for request (and the slowest level does not dominate the run's time).
        for subset, levels in (
            (hf_items, [c for c in args.concurrency if c == 1]),
            (items, [c for c in args.concurrency if c != 1]),
        ):
            if levels:
                runs += run_server(
                    model,
                    options,
                    subset,
                    levels,
                    log,
                    reuse=args.reuse_server,
                    ramp_up=args.ramp_up,
                    on_run=report_progress,
                )

    summaries = {run.system: run.summary() for run in runs}
    hf_summary = summarize(hf_items)
    workload = asdict(summarize(items)) | {
        "seed": args.seed,
        "hf_seq_requests": hf_summary.num_requests,
        "hf_seq_mean_prompt_len": hf_summary.mean_prompt_len,
        "hf_seq_mean_output_len": hf_summary.mean_output_len,
    }
    return {
        "machine": machine_info(args),
        "model": model if args.preset is None else f"random:{args.preset}",
        "quick": args.quick,
        "workload": workload,
        "latency_definitions": list(LATENCY_NOTE),
        "systems": summaries,
        "ratios": ratios(summaries),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work_dir = Path(tmp)
        model = args.model
        if args.preset is not None:
            # On a GPU the weights are written in the dtype they run in: half the bytes to
            # write and read.
            dtype = args.dtype if args.device == "cuda" else "float32"
            start = time.perf_counter()
            model = str(
                create_random(work_dir / args.preset, args.preset, seed=args.seed, dtype=dtype)
            )
            print(f"  wrote {args.preset} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        try:
            result = bench(args, model, work_dir)
        except BenchError as exc:
            print(f"bench_engine: {exc}", file=sys.stderr)
            return 1
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
