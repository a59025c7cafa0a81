"""Control plane settings, read once from the environment and the command line."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path


def deepflow_home() -> Path:
    return Path(os.environ.get("DEEPFLOW_HOME") or Path.home() / ".deepflow").expanduser()


def default_database_url(home: Path) -> str:
    return f"sqlite:///{home / 'deepflow.db'}"


@dataclass(slots=True, frozen=True)
class Settings:
    home: Path
    database_url: str
    host: str = "127.0.0.1"
    port: int = 8480
    # Nodes heartbeat this often; one silent for `node_timeout_s` is unreachable.
    heartbeat_interval_s: float = 2.0
    node_timeout_s: float = 10.0
    reconcile_interval_s: float = 1.0
    # Record writes are batched: flushed when this many are queued or this much time passed.
    record_flush_interval_s: float = 0.05
    record_batch_size: int = 256
    # The activator: a request waits this long for a ready instance (while a deployment scales
    # from zero, say) before 503. `DEEPFLOW_DISPATCH_TIMEOUT_S` sets it.
    dispatch_timeout_s: float = 60.0
    # A task's stream may stay silent this long before the instance is considered lost.
    task_idle_timeout_s: float = 120.0
    max_body_bytes: int = 4 * 1024 * 1024
    # Requests in flight across the platform beyond which new ones get 429.
    max_inflight_requests: int = 1024
    # Uploads through /v1/files larger than this are refused.
    max_file_bytes: int = 512 * 1024 * 1024
    # A training whose trainer fails restarts from its last checkpoint at most this many times.
    fine_tune_max_restarts: int = 2
    # A training task with no report from its node for this long has failed.
    training_report_timeout_s: float = 600.0
    # A queued fine-tuning job waits this long for a ready node before it fails.
    training_queue_timeout_s: float = 3600.0
    # How often in-flight trainings are checked for silence and lost nodes.
    training_watch_interval_s: float = 2.0
    # PD deployments (docs/pd.md): a prefill task that has not handed its K/V over in this long
    # is retried on another instance; the scheduler relearns a deployment's policy (heatmap,
    # decode-length predictor) this often; SGLang's cache-aware thresholds inside a group.
    prefill_timeout_s: float = 60.0
    pd_policy_refresh_s: float = 30.0
    router_cache_threshold: float = 0.3
    router_balance_abs_threshold: int = 64
    router_balance_rel_threshold: float = 1.5
    # An auto deployment's group the heatmap chose loses a request to the other group when its
    # mean in-flight per instance exceeds the other's by this much and by this ratio.
    router_group_balance_abs_threshold: float = 2.0
    router_group_balance_rel_threshold: float = 1.5

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def fine_tunes_dir(self) -> Path:
        return self.home / "fine_tunes"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def from_env(
        cls, *, host: str = "127.0.0.1", port: int = 8480, database_url: str | None = None
    ) -> Settings:
        home = deepflow_home()
        url = database_url or os.environ.get("DEEPFLOW_DATABASE_URL") or default_database_url(home)
        settings = cls(home=home, database_url=url, host=host, port=port)
        timeout = os.environ.get("DEEPFLOW_DISPATCH_TIMEOUT_S")
        if timeout:
            settings = dataclasses.replace(settings, dispatch_timeout_s=float(timeout))
        return settings
