"""Where a FlowServe decode step's time goes: the host's work against the device's.

    python scripts/profile_step.py --preset tiny --fake-forward     # host work only, any machine
    python scripts/profile_step.py --device cuda --preset llama-1b   # on the GPU machine

For each batch size (default 1 and 256): that many requests are prefilled, then `--steps`
decode-only steps are timed, then profiled:

    step ms        wall time per `engine.step()` (what a driver sees)
    host ms        the step minus the time spent waiting for the device (event waits)
    device ms      the device's busy time per step (torch.profiler's kernel time; cuda only)
    cProfile       the host functions that cost most, per step (written to --out)

`--fake-forward` replaces the model with logits of zeros but keeps every host-side piece of the
kernel path (the packed step inputs, graph padding): the scheduler, block manager and metadata
cost the same Python as on a GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from dataplane.flowserve.config import EngineConfig
from dataplane.flowserve.engine import Engine
from dataplane.flowserve.sampling_params import SamplingParams
from dataplane.modelstore import create_random


class _WaitClock:
    """Time spent in device waits (event.synchronize), patched in on the event class."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def install(self) -> None:
        if not torch.cuda.is_available():
            return
        original = torch.cuda.Event.synchronize
        clock = self

        def synchronize(event: torch.cuda.Event) -> None:
            start = time.perf_counter()
            original(event)
            clock.seconds += time.perf_counter() - start

        torch.cuda.Event.synchronize = synchronize  # type: ignore[method-assign]


def fake_forward(engine: Engine) -> None:
    """Keep the kernel path's host work for a decode graph (the batch's inputs, padded to the
    graph's size, packed), drop the model: logits of zeros."""
    import numpy as np

    from dataplane.flowserve import model_runner

    torch.set_num_threads(1)  # the host's own work, not a thread pool's contention
    runner = engine._runner
    logits = torch.zeros(engine.config.max_num_seqs, engine.vocab_size)
    width = -(-engine.max_model_len // engine.config.block_size)
    sizes = model_runner.graph_batch_sizes(engine.config.max_num_seqs)

    def run(batch, pending=None):  # type: ignore[no-untyped-def]
        host = model_runner._HostBatch.of(batch, pending)
        size = next((s for s in sizes if s >= len(host.query_lens)), len(host.query_lens))
        inputs = runner._pad_decode(host, size, width)
        fill = np.asarray(host.fill_rows + host.fill_from, dtype=np.int64)
        packed = np.concatenate([inputs.packed, fill])
        staging = getattr(runner, "_staging", None)  # absent before the staging buffers
        if staging is not None:
            staging.upload(packed)
        else:
            runner.platform.to_device(torch.from_numpy(packed))
        return logits[: len(batch.sampling_seqs)]

    runner.run = run  # type: ignore[method-assign]


def profile_batch(engine: Engine, num_seqs: int, steps: int, out: Path, device: str) -> str:
    params = SamplingParams(max_tokens=steps * 3 + 40, temperature=0.0, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"p{num_seqs}-{i}", [1 + (i * 7 + j) % 50 for j in range(64)], params)
    while any(s.num_uncomputed_tokens > 1 for s in engine._scheduler.running) or (
        engine._scheduler.waiting
    ):
        engine.step()
    for _ in range(5):
        engine.step()
    clock = _WaitClock()
    clock.install()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps
    wait = clock.seconds / steps
    lines = [
        f"batch {num_seqs}: step {wall * 1e3:.3f} ms, host {(wall - wait) * 1e3:.3f} ms, "
        f"waiting for the device {wait * 1e3:.3f} ms"
    ]
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        total = sum(e.device_time_total for e in events) / steps / 1e3
        lines.append(f"batch {num_seqs}: device busy {total:.3f} ms per step")
        (out / f"kernels-{num_seqs}.txt").write_text(
            events.table(sort_by="device_time_total", row_limit=40)
        )
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(35)
    (out / f"host-{num_seqs}.txt").write_text(text.getvalue())
    for request_id in list(engine._sequences):
        engine.abort_request(request_id)
    while engine.has_unfinished():
        engine.step()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-sizes", default="1,256")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--fake-forward", action="store_true")
    p.add_argument("--out", type=Path, default=Path("profile-out"))
    p.add_argument("--model-dir", type=Path, default=None, help="write the model here (kept)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model_dir or Path(tmp) / args.preset
        create_random(model, args.preset, seed=0, dtype=dtype)
        engine = Engine(
            EngineConfig(
                str(model),
                device=args.device,
                dtype=dtype,
                max_num_seqs=max(sizes),
                max_num_batched_tokens=4096,
                async_scheduling=True,
            )
        )
        if args.fake_forward:
            fake_forward(engine)
        report = [profile_batch(engine, n, args.steps, args.out, args.device) for n in sizes]
    text = "\n".join(report)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
