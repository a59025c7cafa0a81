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
from collections.abc import Iterator
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
        """Cores on a host, SMs on a GPU: what a semi-PD split divides between workers."""
        return torch.get_num_threads()

    def sm_partition(self, num_units: int) -> contextlib.AbstractContextManager[None]:
        """Run what is launched inside on at most `num_units` compute units."""
        if not 1 <= num_units <= self.num_compute_units():
            raise ConfigError(f"cannot partition {num_units} of {self.num_compute_units()} units")
        return _threads(num_units)


@contextlib.contextmanager
def _threads(num: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    def sm_partition(self, num_units: int) -> contextlib.AbstractContextManager[None]:
        """A green context of `num_units` SMs where this PyTorch has them."""
        if not 1 <= num_units <= self.num_compute_units():
            raise ConfigError(f"cannot partition {num_units} of {self.num_compute_units()} SMs")
        green = getattr(torch.cuda, "green_contexts", None)
        if green is None:
            raise ConfigError("this PyTorch has no CUDA green contexts for SM partitions")
        context = green.GreenContext.create(num_units, self.device.index or 0)
        return _green(context)


@contextlib.contextmanager
def _green(context: Any) -> Iterator[None]:
    context.make_current()
    try:
        yield
    finally:
        context.pop_context()


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

    def sm_partition(self, num_units: int) -> contextlib.AbstractContextManager[None]:
        raise ConfigError("SM partitions are not available on NPUs")

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
