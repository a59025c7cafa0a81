"""The official `openai` client, unchanged, against the files and fine-tuning API in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fine_tune_support import FakeAgent, chat_jsonl, checkpoint, progress, succeeded

from controlplane.app import create_app
from controlplane.settings import Settings
from dataplane.modelstore import create_random

RESOURCES = {"cpus": 2, "memory_bytes": 8 << 30}


async def wait_until(check: Any, timeout: float = 10.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := await check()):
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
    return value


async def scenario(settings: Settings, tiny: Path, agent: FakeAgent) -> None:
    app = create_app(settings, transport=agent.transport)
    async with app.router.lifespan_context(app):
        node = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cp")
        await node.post("/api/v1/models", json={"name": "tiny", "path": str(tiny)})
        body = {"name": "node-a", "url": "http://node-a:8481", "resources": RESOURCES}
        await node.post("/api/v1/nodes/register", json=body)
        client = openai.AsyncOpenAI(
            base_url="http://cp/v1",
            api_key="unused",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app)),
        )

        # Files
        content = chat_jsonl(4)
        uploaded = await client.files.create(file=("train.jsonl", content), purpose="fine-tune")
        assert uploaded.id.startswith("file-") and uploaded.bytes == len(content)
        other = await client.files.create(file=("more.jsonl", content), purpose="fine-tune")
        listed = [f.id async for f in client.files.list(limit=1)]  # one page at a time
        assert listed == [other.id, uploaded.id]
        assert (await client.files.retrieve(uploaded.id)).filename == "train.jsonl"
        assert (await client.files.content(uploaded.id)).content == content
        with pytest.raises(openai.BadRequestError, match="line 1"):
            await client.files.create(file=("bad.jsonl", b"{}\n"), purpose="fine-tune")
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve("file-nope")

        # Fine-tuning jobs
        with pytest.raises(openai.NotFoundError):
            await client.fine_tuning.jobs.create(model="nope", training_file=uploaded.id)
        job = await client.fine_tuning.jobs.create(
            model="tiny",
            training_file=uploaded.id,
            suffix="demo",
            hyperparameters={"n_epochs": 1, "batch_size": 2},
        )
        assert job.status == "validating_files" and job.hyperparameters.n_epochs == 1
        cancelled = await client.fine_tuning.jobs.create(model="tiny", training_file=other.id)

        async def both_started() -> bool:
            return len(agent.starts) == 2

        await wait_until(both_started)
        assert (await client.fine_tuning.jobs.cancel(cancelled.id)).status == "cancelled"
        jobs = [j.id async for j in client.fine_tuning.jobs.list(limit=1)]
        assert jobs == [cancelled.id, job.id]

        start = next(s for _, s in agent.starts if s.job_id == job.id)
        for report in (
            progress(start.task_id, 1, total=2, loss=2.5),
            checkpoint(start.task_id, 1, start.output_dir),
            progress(start.task_id, 2, total=2, loss=1.5),
        ):
            (
                await node.post(f"/api/v1/tasks/{start.task_id}/report", json=report)
            ).raise_for_status()
        merged = Path(start.output_dir) / "merged"
        shutil.copytree(tiny, merged)
        done = succeeded(start.task_id, merged)
        (await node.post(f"/api/v1/tasks/{start.task_id}/report", json=done)).raise_for_status()

        async def finished() -> Any:
            current = await client.fine_tuning.jobs.retrieve(job.id)
            return current if current.status == "succeeded" else None

        final = await wait_until(finished)
        assert final.fine_tuned_model == f"ft:tiny:demo:{job.id}" and final.trained_tokens == 800
        events = [e async for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]
        losses = [e.data["train_loss"] for e in events if e.type == "metrics" and e.data]
        assert losses[-2:] == [1.5, 2.5]  # newest first
        assert events[0].message == "The job has successfully completed"
        checkpoints = [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert [c.step_number for c in checkpoints] == [1]
        assert checkpoints[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-1")
        models = [m.id async for m in client.models.list()]
        assert final.fine_tuned_model in models
        with pytest.raises(openai.APIStatusError) as late:
            await client.fine_tuning.jobs.cancel(job.id)
        assert late.value.status_code == 409
        assert (await client.files.delete(uploaded.id)).deleted
        await client.close()
        await node.aclose()


def test_the_openai_client_uploads_fine_tunes_and_follows_a_job(tmp_path: Path) -> None:
    tiny = create_random(tmp_path / "tiny", "tiny")
    base = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'df.db'}")
    settings = dataclasses.replace(base, node_timeout_s=1e6, training_watch_interval_s=0.05)
    asyncio.run(scenario(settings, tiny, FakeAgent()))
