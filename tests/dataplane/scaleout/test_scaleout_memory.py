"""Forked SmolLM2-shaped instances share one copy of the weights: what each adds is its own
KV cache and interpreter state, not another 514 MiB. (scripts/bench_scaling.py runs 64.)"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from controlplane.wire import InstanceStart
from dataplane.agent.process import free_port
from dataplane.scaleout.launcher import Launcher
from dataplane.scaleout.memory import memory_use, total_use

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NUM_INSTANCES = 8
MIB = 1 << 20


def test_forked_instances_cost_a_fraction_of_the_weights(
    smollm2_shaped_dir: Path, tmp_path: Path
) -> None:
    launcher = Launcher(log_dir=tmp_path / "logs", cache_dir=tmp_path / "cache", torch_threads=1)
    handles = []
    try:
        zygote = launcher.start_zygote(str(smollm2_shaped_dir), timeout_s=300)
        for i in range(NUM_INSTANCES):
            spec = InstanceStart(
                instance_id=f"m{i}",
                model="smollm2",
                model_path=str(smollm2_shaped_dir),
                engine_args={"kv_cache_memory": 16 * MIB, "max_model_len": 256},
            )
            handles.append(launcher.launch(spec, free_port(), paths=("fork",)))
        for handle in handles:
            handle.wait_ready(300)
            body = {"request_id": "r", "prompt_token_ids": [1, 2, 3], "sampling": {"max_tokens": 1}}
            assert httpx.post(f"{handle.url}/generate", json=body, timeout=120).status_code == 200
        children = total_use([h.pid for h in handles])
        weights = zygote.nbytes
        # RSS counts the weights once per instance; PSS splits them among the 9 mappers.
        assert children.rss > NUM_INSTANCES * weights
        assert (
            children.pss + memory_use(zygote.proc.pid).pss < 2 * weights + NUM_INSTANCES * 100 * MIB
        )
        assert children.uss < NUM_INSTANCES * 100 * MIB  # no child holds a private copy
    finally:
        for handle in handles:
            handle.stop(grace_s=5)
        launcher.close()
