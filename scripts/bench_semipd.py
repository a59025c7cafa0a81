"""semi-PD against colocated and disaggregated serving on one device, at a range of request rates.

    python scripts/bench_semipd.py --device cuda --preset llama-1b --json semipd.json
    python scripts/bench_semipd.py --plot docs/benchmarks/semi-pd.png --from-json semipd.json
    python scripts/bench_semipd.py --from-json a.json b.json --json merged.json   # split runs
    python scripts/bench_semipd.py --quick          # a tiny random model on the CPU (tests)

In one run, on one model (random weights of the preset's shape, or a folder) and one seeded
ShareGPT-like workload (scripts/workload.py), Poisson arrivals at each rate:

    colocated        one engine, chunked prefill (prefill chunks and decodes in one batch)
    disaggregated    a prefill engine and a decode engine, each on half the device's compute
                     units (SMs) with its own weights and K/V pool, K/V handed over in device
                     memory
    semi-pd-static   one semi-PD engine (two workers, one K/V pool), the split fixed
    semi-pd-dynamic  the same with the SLO controller (Algorithm 1) moving the split

SLOs are set the paper's way: `--slo-scale` (7.5, "tight") times the single-request TTFT and
TPOT measured first on the colocated engine, unless given (`--slo-ttft-ms`, `--slo-tpot-ms`).
Each point reports SLO attainment (both within their SLO), P90/P99 TTFT and TPOT, mean
end-to-end latency and output tok/s; each system's sustained rate at 90% attainment is read off
its curve and semi-PD dynamic's is compared with the others (targets: 1.5x colocated, 1.3x
disaggregated). A system whose attainment falls under `--stop-below` skips its higher rates.

A sweep split over several runs (each given the first run's SLOs with `--slo-ttft-ms` and
`--slo-tpot-ms`) is put together with `--from-json` over their files: each system's points from
all of them, a later file's point replacing an earlier one's at the same rate; runs whose SLOs
differ are refused.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from semipd_metrics import poisson_arrivals, rate_point, sustained_rate
from semipd_systems import Disaggregated, SingleEngine, System, greedy
from workload import WorkItem, make_workload, summarize

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine, open_engine
from dataplane.modelstore import PRESETS, create_random

SYSTEMS = ("colocated", "disaggregated", "semi-pd-static", "semi-pd-dynamic")
TARGETS = {"colocated": 1.5, "disaggregated": 1.3}
LEVEL = 0.9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a Hugging Face folder (else --preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="write a random model of this shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a host")
    p.add_argument("--rates", default="10,20,40,60,80,100,120", help="requests per second")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per rate")
    p.add_argument("--min-requests", type=int, default=60)
    p.add_argument("--max-requests", type=int, default=1200)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--slo-scale", type=float, default=7.5)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--split", type=int, default=50, help="semi-PD's (initial) prefill share")
    p.add_argument("--window", type=float, default=1.0, help="semi-PD dynamic's window (s)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--kv-gib", type=float, default=None, help="K/V pool per system")
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-out", type=int, default=256)
    p.add_argument("--stop-below", type=float, default=0.5)
    p.add_argument("--warmup-requests", type=int, default=120)
    p.add_argument("--warmup-rate", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--json", type=Path, help="write the result here (after every point)")
    p.add_argument("--plot", type=Path, help="attainment vs rate (PNG; needs matplotlib)")
    p.add_argument(
        "--from-json", type=Path, nargs="+", help="only render saved results, merged (--plot)"
    )
    p.add_argument("--quick", action="store_true", help="tiny model, short run on the CPU")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = args.preset or "tiny"
        args.device = "cpu"
        args.rates, args.duration, args.min_requests, args.max_requests = "4,16", 1.0, 6, 16
        args.max_prompt, args.max_out, args.max_num_seqs, args.chunk = 64, 16, 16, 256
        args.warmup_requests, args.warmup_rate = 6, 8.0
    if args.from_json is None and args.model is None and args.preset is None:
        p.error("pass --model PATH or --preset NAME")
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.kv_gib is None:
        args.kv_gib = 24.0 if args.device == "cuda" else 0.25
    return args


def engine_config(
    args: argparse.Namespace, model: str, kv_gib: float, **extra: Any
) -> EngineConfig:
    return EngineConfig(
        model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.chunk,
        kv_cache_bytes=int(kv_gib * (1 << 30)),
        enforce_eager=args.eager,
        **extra,
    )


def single_request_latency(engine: Engine, items: list[WorkItem]) -> tuple[float, float]:
    """(TTFT, TPOT) of one request alone, median of 3: prompts of the workload's mean length,
    128 tokens out."""
    mean_len = round(summarize(items).mean_prompt_len)
    chosen = sorted(items, key=lambda i: abs(len(i.prompt_token_ids) - mean_len))[:4]
    ttfts, tpots = [], []
    for n, item in enumerate(chosen):
        engine.add_request(f"cal{n}", list(item.prompt_token_ids), greedy(128))
        start, times = time.perf_counter(), []
        while engine.has_unfinished():
            for out in engine.step():
                if out.new_token_id is not None:
                    times.append(time.perf_counter())
        if n == 0:
            continue  # warm-up
        ttfts.append(times[0] - start)
        tpots.append((times[-1] - times[0]) / (len(times) - 1))
    return sorted(ttfts)[1], sorted(tpots)[1]


def build(name: str, args: argparse.Namespace, model: str, slo: tuple[float, float]) -> System:
    semi = {"slo_ttft_ms": slo[0] * 1e3, "slo_tpot_ms": slo[1] * 1e3, "semi_pd_split": args.split}
    if name == "colocated":
        return SingleEngine(name, Engine(engine_config(args, model, args.kv_gib)))
    if name == "disaggregated":
        half = args.kv_gib / 2
        prefill = Engine(engine_config(args, model, half))
        decode = Engine(engine_config(args, model, half))
        return Disaggregated(prefill, decode, args.split)
    static = name == "semi-pd-static"
    config = engine_config(
        args,
        model,
        args.kv_gib,
        semi_pd=True,
        semi_pd_static=static,
        semi_pd_window_s=args.window,
        **semi,
    )
    return SingleEngine(name, open_engine(config))


def run_point(
    system: System, items: list[WorkItem], rate: float, seed: int, slo: tuple[float, float]
) -> dict[str, Any]:
    offsets = poisson_arrivals(rate, len(items), seed)
    system.traces.clear()
    t0 = time.perf_counter()
    for i, (offset, item) in enumerate(zip(offsets, items, strict=True)):
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        system.submit(f"q{rate:g}-{i}", list(item.prompt_token_ids), item.max_tokens)
    deadline = time.perf_counter() + max(30.0, 4 * offsets[-1])
    while time.perf_counter() < deadline and not system.errors():
        if all(t.done for t in system.traces.values()):
            break
        time.sleep(0.01)
    if system.errors():
        raise RuntimeError(f"{system.name} failed at {rate:g} req/s") from system.errors()[0]
    traces = list(system.traces.values())
    last = max((t.token_times[-1] for t in traces if t.token_times), default=t0)
    point = rate_point(rate, traces, slo[0], slo[1], last - t0)
    timed_out = not all(t.done for t in traces)
    extra: dict[str, Any] = {}
    if timed_out:
        stuck = [t for t in traces if not t.done]
        extra["stuck"] = {
            "num": len(stuck),
            "by_tokens_received": dict(Counter(min(len(t.token_times), 2) for t in stuck)),
            "sample": [(len(t.token_times), t.max_tokens) for t in stuck[:8]],
            **system.diagnose(),
            "engine_threads": engine_stacks(),
        }
    return {**asdict(point), "timed_out": timed_out, **system.describe(), **extra}


def engine_stacks() -> dict[str, list[str]]:
    """Where each engine thread is now, innermost frames last (a point that timed out: a
    thread blocked in a device sync shows here, one still stepping shows the step)."""
    frames = sys._current_frames()
    return {
        f"{t.name}-{t.ident}": traceback.format_stack(frames[t.ident])[-6:]
        for t in threading.enumerate()
        if t.name == "bench-engine" and t.ident in frames
    }


def bench(args: argparse.Namespace, model: str) -> dict[str, Any]:
    rates = [float(r) for r in args.rates.split(",")]
    sizes = [
        min(args.max_requests, max(args.min_requests, round(r * args.duration))) for r in rates
    ]
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    items = make_workload(
        sum(sizes) + 8 + args.warmup_requests,
        args.seed,
        vocab,
        avoid_token_ids=range(3),
        max_prompt=args.max_prompt,
        max_out=args.max_out,
        system_prompt_len=min(128, args.max_prompt // 2),
    )
    calibration = items[:8]
    warmup = items[8 : 8 + args.warmup_requests]
    pool = items[8 + args.warmup_requests :]
    batches, start = [], 0
    for n in sizes:
        batches.append(pool[start : start + n])
        start += n
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "model": model if args.preset is None else f"random:{args.preset}",
        "dtype": args.dtype,
        "workload": asdict(summarize(pool)),
        "settings": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
        "systems": {},
    }
    slo = (args.slo_ttft_ms, args.slo_tpot_ms)
    if slo[0] is None or slo[1] is None:
        probe = Engine(engine_config(args, model, args.kv_gib))
        single = single_request_latency(probe, calibration)
        probe.close()
        del probe
        release()
        result["single_request"] = {"ttft_s": single[0], "tpot_s": single[1]}
        slo = (args.slo_scale * single[0], args.slo_scale * single[1])
        print(f"single request: TTFT {single[0] * 1e3:.2f} ms, TPOT {single[1] * 1e3:.2f} ms")
    else:
        slo = (slo[0] / 1e3, slo[1] / 1e3)
    result["slo"] = {"ttft_s": slo[0], "tpot_s": slo[1], "scale": args.slo_scale}
    print(f"SLOs: TTFT {slo[0] * 1e3:.1f} ms, TPOT {slo[1] * 1e3:.2f} ms", flush=True)
    for name in args.systems.split(","):
        built = time.perf_counter()
        system = build(name, args, model, slo)
        points: list[dict[str, Any]] = []
        result["systems"][name] = {"points": points, "build_s": time.perf_counter() - built}
        try:
            # Warm-up, discarded: every kernel and graph shape the points will meet.
            run_point(system, warmup, args.warmup_rate, args.seed + 99, slo)
            for i, (rate, batch) in enumerate(zip(rates, batches, strict=True)):
                point = run_point(system, batch, rate, args.seed + i, slo)
                points.append(point)
                print(
                    f"{name:>16} {rate:7g} req/s  attainment {point['attainment']:.3f}"
                    f"  {point['output_tok_s']:.0f} tok/s  {point_extra(point)}",
                    flush=True,
                )
                save(args, result)
                if point["attainment"] < args.stop_below or point["timed_out"]:
                    break
        except RuntimeError as exc:
            result["systems"][name]["error"] = f"{exc}: {exc.__cause__!r}"
            print(f"{name}: {exc}: {exc.__cause__!r}", file=sys.stderr)
        finally:
            system.close()
            del system
            release()
        curve = [(p["rate"], p["attainment"]) for p in points]
        result["systems"][name]["sustained_rate"] = sustained_rate(curve, LEVEL)
        save(args, result)
    result["ratios"] = ratios(result)
    save(args, result)
    return result


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of one sweep: the first run's header, every system's points by
    rate (a later run's replacing an earlier one's), sustained rates and ratios recomputed.
    Raises SystemExit when the runs' SLOs differ (by more than rounding)."""
    first = results[0]
    for other in results[1:]:
        for key in ("ttft_s", "tpot_s"):
            a, b = first["slo"][key], other["slo"][key]
            if abs(a - b) > 0.01 * a:
                raise SystemExit(f"the runs' SLOs differ ({key}: {a} and {b}); not merged")
    systems: dict[str, dict[str, Any]] = {}
    for result in results:
        for name, entry in result["systems"].items():
            merged = systems.setdefault(name, {"points": {}})
            merged["points"].update({p["rate"]: p for p in entry["points"]})
            if "error" in entry:
                merged["error"] = entry["error"]
    out = {**first, "systems": {}, "merged_from": len(results)}
    for name, entry in systems.items():
        points = [entry["points"][rate] for rate in sorted(entry["points"])]
        curve = [(p["rate"], p["attainment"]) for p in points]
        out["systems"][name] = {
            **{k: v for k, v in entry.items() if k != "points"},
            "points": points,
            "sustained_rate": sustained_rate(curve, LEVEL),
        }
    out["ratios"] = ratios(out)
    return out


def point_extra(point: dict[str, Any]) -> str:
    if "prefill_units" not in point:
        return ""
    share = point.get("prefill_share")
    return f"(prefill {point['prefill_units']} / decode {point['decode_units']} units" + (
        f", share {share}%, {point['num_switches']} switches)" if share is not None else ")"
    )


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    systems = result["systems"]
    ours = systems.get("semi-pd-dynamic", {}).get("sustained_rate")
    out = {}
    for peer, target in TARGETS.items():
        theirs = systems.get(peer, {}).get("sustained_rate")
        value = ours / theirs if ours is not None and theirs else None
        out[peer] = {
            "value": value,
            "target": target,
            "pass": value is not None and value >= target,
        }
    return out


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def render(result: dict[str, Any]) -> str:
    slo = result["slo"]
    lines = [
        f"device: {result['device']}, torch {result['torch']}, {result['date']}; model "
        f"{result['model']} ({result['dtype']})",
        f"SLOs: TTFT {slo['ttft_s'] * 1e3:.1f} ms, TPOT {slo['tpot_s'] * 1e3:.2f} ms "
        f"({slo['scale']}x single request)",
        "",
        "| system | req/s | attainment | TTFT p90 / p99 (ms) | TPOT p90 / p99 (ms) | mean e2e (s) "
        "| output tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in result["systems"].items():
        for p in entry["points"]:
            lines.append(
                f"| {name} | {p['rate']:g} | {p['attainment']:.3f} | {_ms(p['ttft_p90_s'])} / "
                f"{_ms(p['ttft_p99_s'])} | {_ms(p['tpot_p90_s'], 2)} / {_ms(p['tpot_p99_s'], 2)} "
                f"| {_f(p['e2e_mean_s'])} | {p['output_tok_s']:.0f} |"
            )
    lines += ["", f"| system | req/s at {LEVEL:.0%} attainment |", "|---|---:|"]
    for name, entry in result["systems"].items():
        rate = _f(entry.get("sustained_rate"), 1)
        points = entry["points"]
        if points and all(p["attainment"] >= LEVEL for p in points):
            rate = f">= {rate} (never below; the highest rate run)"
        lines.append(f"| {name} | {rate} |")
    lines += ["", "| semi-pd-dynamic vs | ratio | target | |", "|---|---:|---:|---|"]
    for peer, r in result.get("ratios", {}).items():
        verdict = "PASS" if r["pass"] else "FAIL"
        lines.append(f"| {peer} | {_f(r['value'], 2)} | {r['target']}x | {verdict} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in result["systems"].items():
        pts = entry["points"]
        ax.plot([p["rate"] for p in pts], [100 * p["attainment"] for p in pts], "o-", label=name)
    ax.axhline(100 * LEVEL, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    slo = result["slo"]
    ax.set_title(
        f"{result['model']} on {result['device']}: TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, "
        f"TPOT <= {slo['tpot_s'] * 1e3:.1f} ms",
        fontsize=9,
    )
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ms(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * 1e3:.{digits}f}"


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        result = merge([json.loads(path.read_text()) for path in args.from_json])
        save(args, result)
    else:
        import transformers

        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        with tempfile.TemporaryDirectory(prefix="bench-semipd-") as tmp:
            model = args.model
            if args.preset is not None:
                model = str(
                    create_random(
                        Path(tmp) / args.preset, args.preset, seed=args.seed, dtype=args.dtype
                    )
                )
            result = bench(args, model)
    print(render(result))
    if args.plot is not None:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
