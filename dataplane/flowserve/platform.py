"""What differs between devices, in one place: streams, events, graphs, memory, IPC, SM partitions.

The engine asks `get_platform(device)` and never branches on the device's name itself:

    platform.dtype_default            # float32 on a host, bfloat16 on an accelerator
    platform.to_device(host_tensor)   # pinned + non-blocking where that exists: no host sync
    platform.free_memory()            # bytes free now
    platform.supports_graphs          # decode can be captured and replayed
    platform.triton_kernels           # FlowServe's Triton kernels run here
    platform.device_share()           # CUDA IPC with other instances of the node, or None

`torch_npu` is imported only by `NpuPlatform`, when an NPU is asked for.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dataplane.flowserve.errors import ConfigError

if TYPE_CHECKING:
    from dataplane.flowserve.device_share import DeviceShare

CUDA_KV_FRACTION = 0.85
CPU_KV_FRACTION = 0.1


class Platform:
    """The host (CPU). Accelerators override what they do differently."""

    name = "cpu"
    dtype_default: torch.dtype = torch.float32
    kv_fraction_default = CPU_KV_FRACTION  # instances on one host share its memory
    supports_graphs = False
    triton_kernels = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    # --- data movement ------------------------------------------------------------------------

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on this device, without waiting for the device to drain."""
        return host

    def to_host_async(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(host copy, event): the copy is complete once the event is (None: already)."""
        return tensor, None

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host buffer to stage copies to this device through (pinned where that exists)."""
        return torch.empty(numel, dtype=dtype)

    # --- synchronisation ----------------------------------------------------------------------

    def synchronize(self) -> None:
        pass

    def stream(self) -> Any:
        """A new stream (None on the host, where work runs in order anyway)."""
        return None

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        yield

    def event(self) -> Any:
        """An event to record after launched work, or None where work is synchronous."""
        return None

    # --- graphs -------------------------------------------------------------------------------

    def graph(self) -> Any:
        raise ConfigError(f"{self.name} cannot capture graphs")

    def graph_pool(self) -> Any:
        raise ConfigError(f"{self.name} cannot capture graphs")

    @contextlib.contextmanager
    def capture(self, graph: Any, pool: Any) -> Iterator[None]:
        raise ConfigError(f"{self.name} cannot capture graphs")
        yield

    # --- memory -------------------------------------------------------------------------------

    def free_memory(self) -> int:
        """Bytes free now: the host's available memory."""
        try:
            import psutil
        except ImportError:
            return _mem_available_from_proc()
        return int(psutil.virtual_memory().available)

    def reset_peak_memory(self) -> None:
        pass

    def peak_memory(self) -> int:
        """Bytes allocated at the peak since `reset_peak_memory` (0 where not tracked)."""
        return 0

    def device_name(self) -> str:
        return "cpu"

    # --- sharing and partitioning -------------------------------------------------------------

    def ipc_handle(self, tensor: torch.Tensor) -> Any:
        """A handle another process can open to map `tensor` (e.g. a KV cache for a decode
        worker). Host tensors move to shared memory and are picklable as they are."""
        return tensor.share_memory_()  # type: ignore[no-untyped-call]

    def open_ipc_handle(self, handle: Any) -> torch.Tensor:
        assert isinstance(handle, torch.Tensor)
        return handle

    def device_share(self) -> DeviceShare | None:
        """How another instance of the node opens this device's memory (a prefill's K/V handed
        over without the host, dataplane.flowserve.device_share), or None where it cannot: the
        host, whose K/V go through files."""
        return None

    def num_compute_units(self) -> int:
        """Cores on a host (the intra-op threads of the calling thread), SMs on a GPU: what a
        semi-PD split divides between its workers."""
        return torch.get_num_threads()

    @property
    def partition_granularity(self) -> int:
        """A partition's units come in multiples of this (and at least this many)."""
        return 1

    def compute_partitions(self, units: Sequence[int]) -> list[ComputePartition]:
        """One partition per entry of `units`, for one worker thread each (semi-PD). On a host,
        each is a number of intra-op threads for the thread that binds it (more threads than
        cores is allowed: they time-share)."""
        if not units or not all(n >= 1 for n in units):
            raise ConfigError(f"cannot partition the host's threads as {list(units)}")
        return [ThreadPartition(n) for n in units]


class ComputePartition:
    """A share of the device's compute for one worker thread (semi-PD): intra-op threads on a
    host, SMs on a GPU. The worker takes it at an iteration boundary (`bind`, on its own thread,
    given the partition it ran on until then) and runs each iteration inside `active()`."""

    def __init__(self, num_units: int) -> None:
        self.num_units = num_units

    def bind(self, previous: ComputePartition | None) -> None:
        """Make the calling thread run on this partition from now on."""

    def active(self) -> contextlib.AbstractContextManager[None]:
        """Around each iteration: where its work is launched."""
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_units})"


class ThreadPartition(ComputePartition):
    """`num_units` intra-op threads for the thread that binds it.

    `torch.set_num_threads` is per thread under PyTorch's OpenMP backend (the default on
    Linux): it sets the calling thread's OpenMP thread count (`omp_set_num_threads`, a per-thread
    ICV) and MKL's thread-local one, and every host thread that opens parallel regions gets an
    OpenMP team of its own, so workers bound to 1 and 3 threads run on 1 + 3 threads at once
    (tests/dataplane/flowserve/test_flowserve_semipd_partitions.py counts them). It also sets a
    process-wide default, and a thread initialises its own count from that default on its first
    parallel op (or `get_num_threads`), even after a `set_num_threads` of its own: `bind` makes
    that first query before setting the count, or a later worker's count would leak into it.
    Under the native thread pool (no OpenMP) the count is one for the whole process: there a
    partition only records its share (`per_thread` is False)."""

    per_thread = "OpenMP" in torch.__config__.parallel_info().split("parallel backend:")[-1]

    def bind(self, previous: ComputePartition | None) -> None:
        if self.per_thread:
            # A thread's first parallel op (or this query) initialises its count from the
            # process default, which another worker may have changed meanwhile: initialise
            # first, so that nothing overwrites the count set next.
            torch.get_num_threads()
            torch.set_num_threads(self.num_units)


class CudaPlatform(Platform):
    name = "cuda"
    dtype_default = torch.bfloat16
    kv_fraction_default = CUDA_KV_FRACTION
    supports_graphs = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.triton_kernels = _triton_importable()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        if host.is_cuda:  # e.g. K/V copied from another instance's GPU on a stream of their own
            tensor = host.to(self.device, non_blocking=True)
            # Its memory stays reserved until what is launched now on this stream has run.
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
            return tensor
        # A copy from pageable memory waits for the stream to drain; from pinned memory it does
        # not. The caching host allocator keeps the pinned buffer until the copy has run.
        return host.pin_memory().to(self.device, non_blocking=True)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def to_host_async(self, tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = self.event()
        event.record()
        return host, event

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def stream(self) -> Any:
        return torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        with torch.cuda.stream(stream):
            yield

    def event(self) -> Any:
        return torch.cuda.Event()  # type: ignore[no-untyped-call]

    def graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def graph_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def capture(self, graph: Any, pool: Any) -> Iterator[None]:
        with torch.cuda.graph(graph, pool=pool):
            yield

    def free_memory(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def device_name(self) -> str:
        return str(torch.cuda.get_device_name(self.device))

    def ipc_handle(self, tensor: torch.Tensor) -> Any:
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(tensor)  # type: ignore[no-untyped-call]

    def open_ipc_handle(self, handle: Any) -> torch.Tensor:
        rebuild, args = handle
        tensor: torch.Tensor = rebuild(*args)
        return tensor

    def device_share(self) -> DeviceShare | None:
        from dataplane.flowserve.device_share import CudaIpc

        return CudaIpc(self.device)

    def num_compute_units(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).multi_processor_count)

    @property
    def partition_granularity(self) -> int:
        """CUDA splits SMs into groups of a multiple of 8 on compute capability 9.x and
        later (Hopper), of 2 (at least 4) on 8.x, of 2 before."""
        major, _minor = torch.cuda.get_device_capability(self.device)
        return 8 if major >= 9 else 4 if major == 8 else 2

    def compute_partitions(self, units: Sequence[int]) -> list[ComputePartition]:
        """A CUDA green context of `units[i]` SMs per worker, each with a stream of its own.
        Where PyTorch can split the device's SMs into disjoint groups (`SMPartition`) and the
        units fit the device, the partitions share no SM; `GreenContext.create(num_sms=n)`
        alone takes each group from the whole device, so two of them may overlap."""
        total = self.num_compute_units()
        if not units or not all(1 <= n <= total for n in units):
            raise ConfigError(f"cannot partition {list(units)} of {total} SMs")
        try:
            from torch.cuda import green_contexts
        except ImportError as exc:
            raise ConfigError("this PyTorch has no CUDA green contexts") from exc
        index = self.device.index if self.device.index is not None else 0
        contexts = _green_contexts(green_contexts, list(units), total, index)
        if not all(hasattr(context, "Stream") for context in contexts):
            raise ConfigError("this PyTorch's green contexts have no streams (GreenContext.Stream)")
        return [
            GreenPartition(n, context, context.Stream())
            for n, context in zip(units, contexts, strict=True)
        ]


class GreenPartition(ComputePartition):
    """`num_units` SMs: a CUDA green context and one stream of it. What the worker launches
    inside `active()` (kernels, graph replays, copies) goes to that stream and runs on the
    context's SMs only."""

    def __init__(self, num_units: int, context: Any, stream: Any) -> None:
        super().__init__(num_units)
        self.context = context  # owns the stream: kept alive with the partition
        self.stream = stream

    def bind(self, previous: ComputePartition | None) -> None:
        # Work still queued on the old stream (a prefill chunk that sampled nothing) comes first.
        if isinstance(previous, GreenPartition):
            self.stream.wait_stream(previous.stream)
        else:
            self.stream.wait_stream(torch.cuda.current_stream())

    def active(self) -> contextlib.AbstractContextManager[None]:
        return torch.cuda.stream(self.stream)


def _green_contexts(module: Any, units: list[int], total: int, index: int) -> list[Any]:
    """Green contexts of `units` SMs on device `index`: disjoint groups where PyTorch splits
    the device's SMs (torch.cuda.green_contexts.SMPartition) and they fit, else one context per
    count taken from the whole device."""
    splitter = getattr(module, "SMPartition", None)
    if splitter is not None and sum(units) <= total:
        groups, _rest = splitter.from_device(index).split(num_sms=units)
        return [module.GreenContext(sm_partition=group, device_id=index) for group in groups]
    return [module.GreenContext.create(num_sms=n, device_id=index) for n in units]


class NpuPlatform(CudaPlatform):
    """Ascend NPUs through torch_npu, which mirrors torch.cuda's API under torch.npu."""

    name = "npu"

    def __init__(self, device: torch.device) -> None:
        Platform.__init__(self, device)
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)
        except ImportError as exc:
            raise ConfigError("device npu needs torch_npu (pip install deepflow[npu])") from exc
        self.npu: Any = torch.npu  # type: ignore[attr-defined]
        self.triton_kernels = False

    def synchronize(self) -> None:
        self.npu.synchronize(self.device)

    def stream(self) -> Any:
        return self.npu.Stream(self.device)

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        with self.npu.stream(stream):
            yield

    def event(self) -> Any:
        return self.npu.Event()

    def graph(self) -> Any:
        return self.npu.NPUGraph()

    def graph_pool(self) -> Any:
        return self.npu.graph_pool_handle()

    @contextlib.contextmanager
    def capture(self, graph: Any, pool: Any) -> Iterator[None]:
        with self.npu.graph(graph, pool=pool):
            yield

    def free_memory(self) -> int:
        free, _total = self.npu.mem_get_info(self.device)
        return int(free)

    def reset_peak_memory(self) -> None:
        self.npu.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return int(self.npu.max_memory_allocated(self.device))

    def device_name(self) -> str:
        return str(self.npu.get_device_name(self.device))

    def num_compute_units(self) -> int:
        return int(getattr(self.npu.get_device_properties(self.device), "cube_core_num", 1))

    def compute_partitions(self, units: Sequence[int]) -> list[ComputePartition]:
        raise ConfigError("compute partitions (semi-PD) are not available on NPUs")

    def device_share(self) -> DeviceShare | None:
        return None  # no IPC here yet: K/V go through the host


_PLATFORMS: dict[str, type[Platform]] = {
    "cpu": Platform,
    "cuda": CudaPlatform,
    "npu": NpuPlatform,
}


def detect_device() -> torch.device:
    """The best device present: cuda, else npu (when torch_npu is installed), else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return torch.device("npu")
    return torch.device("cpu")


def is_available(name: str) -> bool:
    if name == "cpu":
        return True
    if name == "cuda":
        return torch.cuda.is_available()
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


@functools.cache
def get_platform(device: torch.device | str) -> Platform:
    device = torch.device(device)
    cls = _PLATFORMS.get(device.type)
    if cls is None:
        raise ConfigError(f"no platform for device {device.type!r}; known: {sorted(_PLATFORMS)}")
    return cls(device)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _mem_available_from_proc(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"cannot read free memory from {meminfo}: {exc}") from exc
    raise ConfigError(f"{meminfo} has no MemAvailable line")
