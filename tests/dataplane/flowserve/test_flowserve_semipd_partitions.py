"""Compute partitions for semi-PD's workers. On a host: torch.set_num_threads is per thread
under PyTorch's OpenMP backend, so two worker threads bound to 1 and 3 threads keep their own
counts and run their parallel ops on teams of those sizes. On a GPU (`pytest -m gpu`): green
contexts restrict a worker's kernels to its SMs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from dataplane.flowserve.errors import ConfigError
from dataplane.flowserve.platform import ComputePartition, ThreadPartition, get_platform

TASKS = Path("/proc/self/task")


def os_threads() -> int:
    return len(os.listdir(TASKS))


def parallel_work() -> None:
    a = torch.randn(512, 512)
    for _ in range(3):
        a @ a
        (a * 2.0).sum()


@pytest.mark.skipif(not ThreadPartition.per_thread, reason="needs PyTorch's OpenMP backend")
@pytest.mark.skipif(not TASKS.exists(), reason="counts threads through /proc")
def test_each_worker_thread_keeps_its_own_thread_count() -> None:
    partitions = get_platform("cpu").compute_partitions([1, 3])
    main_threads = torch.get_num_threads()
    seen: dict[int, tuple[int, int]] = {}
    both_bound = threading.Barrier(2)
    turn = {1: threading.Event(), 3: threading.Event()}
    done = threading.Barrier(2)

    def worker(partition: ComputePartition) -> None:
        partition.bind(None)
        both_bound.wait()  # the other thread has set its own count by now
        turn[partition.num_units].wait()  # one at a time, so that each counts its own team
        before = os_threads()
        parallel_work()
        # OpenMP's team for this thread: itself plus num_units - 1 threads of its own.
        seen[partition.num_units] = (torch.get_num_threads(), os_threads() - before)
        if partition.num_units == 1:
            turn[3].set()
        done.wait()  # teams live as long as their thread: count before either exits

    threads = [threading.Thread(target=worker, args=(p,)) for p in partitions]
    for thread in threads:
        thread.start()
    turn[1].set()
    for thread in threads:
        thread.join(30)
    assert seen[1] == (1, 0)  # no team: it runs its parallel ops alone
    assert seen[3] == (3, 2)  # a team of three
    assert torch.get_num_threads() == main_threads  # the main thread's own count is untouched


def test_host_partitions_refuse_nonsense() -> None:
    platform = get_platform("cpu")
    assert platform.partition_granularity == 1
    with pytest.raises(ConfigError):
        platform.compute_partitions([])
    with pytest.raises(ConfigError):
        platform.compute_partitions([2, 0])


# --- CUDA green contexts (run on the GPU machine) --------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_green_partitions_confine_kernels_to_their_sms() -> None:
    platform = get_platform("cuda")
    total = platform.num_compute_units()
    grain = platform.partition_granularity
    small, large = grain, (total - grain) // grain * grain
    partitions = platform.compute_partitions([small, large])
    assert [p.num_units for p in partitions] == [small, large]
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def seconds_on(partition: ComputePartition) -> float:
        partition.bind(None)
        with partition.active():
            for _ in range(3):  # warm-up
                a @ a
            torch.cuda.current_stream().synchronize()
            started = time.perf_counter()
            for _ in range(20):
                a @ a
            torch.cuda.current_stream().synchronize()
        return time.perf_counter() - started

    slow, fast = seconds_on(partitions[0]), seconds_on(partitions[1])
    # A compute-bound product on `small` SMs takes about large / small times as long.
    assert slow > 0.5 * (large / small) * fast, (slow, fast)
