"""Where a run's buffers live: storage buffers on the host, compute buffers on the device.

On the CPU everything is one host buffer set, as always. On another device (`cuda`, `cuda:N`)
the read and write buffers stay on the host (pinned, so copies run at full speed and without
a staging copy); each chunk is copied to a device buffer for the math and its result back
(engine/pipeline.py). `TWIN` runs that same path on the CPU: host buffers, copies into
"device" buffers whose tensors refuse `.numpy()` (as CUDA tensors do) and make every method
take its torch path (methods/_host.py). Tests use it; users never name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from moemerge._lazy import torch  # loaded on first use: plan, inspect, --help never load it

from moemerge.engine.constants import ALIGN
from moemerge.errors import ConfigError
from moemerge.methods._host import TWIN_FLAG, host_copy
from moemerge.sizes import format_size

if TYPE_CHECKING:
    from moemerge.planner.plan import Plan

__all__ = ["TWIN", "Placement", "placement", "allocate", "device_bytes", "check_device_memory", "twin_tensor",
           "to_host"]

#: Internal device name: the device path (host buffers, copies, torch kernels) on the CPU.
TWIN = "cpu-twin"
#: Host buffers in page-locked memory (the host side of a CUDA run).
PINNED = "cpu-pinned"
#: Share of the device's free memory a plan may count on: the caching allocator rounds
#: blocks up and torch's kernels take small workspaces of their own.
DEVICE_HEADROOM = 0.9


@dataclass(frozen=True, slots=True, kw_only=True)
class Placement:
    """Where one run's buffers go."""

    device: str
    """The compute device as the run names it: `cpu`, `cuda`, `cuda:N` or `TWIN`."""
    staged: bool
    """Whether chunks are copied host -> device for the math and back (any device but `cpu`)."""
    host_kind: str
    """Allocation kind of the read and write buffers (`cpu`, or `PINNED` for CUDA)."""

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def synchronize(self) -> None:
        """Wait for the copies and kernels queued so far (before the host touches their bytes)."""
        if self.cuda:
            torch.cuda.current_stream(torch.device(self.device)).synchronize()


def placement(device: str) -> Placement:
    """The buffers' places for `--device device` (`cpu` keeps the one-buffer-set path)."""
    if device == "cpu":
        return Placement(device="cpu", staged=False, host_kind="cpu")
    if device == TWIN:
        return Placement(device=TWIN, staged=True, host_kind="cpu")
    return Placement(device=device, staged=True, host_kind=PINNED)


def allocate(nbytes: int, kind: str) -> torch.Tensor:
    """A zeroed uint8 buffer of `nbytes` of allocation kind `kind` (a `Placement`'s kinds)."""
    if kind == "cpu":
        return torch.zeros(nbytes, dtype=torch.uint8)
    if kind == PINNED:
        # zeroed now: first-touch page faults on every chunk cost ~10% (engine/buffers.py)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).zero_()
    if kind == TWIN:
        return twin_tensor(torch.zeros(nbytes, dtype=torch.uint8))
    return torch.zeros(nbytes, dtype=torch.uint8, device=kind)


def twin_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` as a "device" tensor of the CPU twin (same memory)."""
    return t.as_subclass(_twin_class())


def _host_target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a `Tensor.to(...)` call names the CPU as its device."""
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, str) and a.split(":")[0] == "cpu":
            return True
        if isinstance(a, torch.device) and a.type == "cpu":
            return True
    return False


def _tensors(obj: Any) -> list[Any]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _mixes_host_tensors(args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether an op's tensors mix twin tensors with plain host tensors of one or more
    dimensions (CUDA accepts 0-d host tensors as scalars, nothing else)."""
    ts = _tensors(list(args)) + _tensors(list(kwargs.values()))
    return any(getattr(t, TWIN_FLAG, False) for t in ts) and \
        any(not getattr(t, TWIN_FLAG, False) and t.dim() > 0 for t in ts)


#: Ops that may take host and device tensors together: copies between the two.
_CROSS_DEVICE: frozenset[Any] = frozenset()


@lru_cache(maxsize=1)
def _twin_class() -> type:
    """The CPU twin's tensor type (made on first use: torch loads only when it is needed)."""

    class DeviceTwinTensor(torch.Tensor):
        """A CPU tensor that stands for device memory: results of torch ops on it stay twin
        tensors; `.numpy()` fails as on CUDA; `.cpu()` / `.to("cpu")` give a plain copy."""

        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func in (torch.Tensor.numpy, torch.Tensor.__array__):
                raise RuntimeError(
                    "moemerge device path: .numpy() of a device tensor (it fails on CUDA); "
                    "take a host copy first (methods/_host.py host_copy) or use the torch path")
            if func is torch.Tensor.cpu or (func is torch.Tensor.to and _host_target(args, kwargs)):
                with torch._C.DisableTorchFunctionSubclass():
                    src = args[0].as_subclass(torch.Tensor)
                    out = func(src, *args[1:], **kwargs)
                    if out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                        out = out.clone()  # a device -> host move always copies
                return out
            if func not in _CROSS_DEVICE and _mixes_host_tensors(args, kwargs):
                raise RuntimeError(
                    f"moemerge device path: {getattr(func, '__name__', func)} mixes a device tensor with a "
                    "host tensor (it fails on CUDA); move the host tensor with `methods/_host.py` "
                    "same_device(t, x)")
            return super().__torch_function__(func, types, args, kwargs)  # type: ignore[no-untyped-call]

    global _CROSS_DEVICE
    _CROSS_DEVICE = frozenset({torch.Tensor.copy_, torch.Tensor.to, torch.Tensor.cpu})
    setattr(DeviceTwinTensor, TWIN_FLAG, True)
    return DeviceTwinTensor


def to_host(obj: Any) -> Any:
    """`obj` (statistics partials: tensors, possibly in dicts, lists, tuples) with every device
    tensor replaced by a host copy, so a Dask task hands back nothing that needs a GPU."""
    if isinstance(obj, torch.Tensor):
        return host_copy(obj)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def device_bytes(plan: Plan) -> int:
    """Device memory a staged run of `plan` needs: one chunk's read and write staging
    buffers, the compute buffers and the method's temporaries (engine/pipeline.py)."""
    from moemerge.methods import get_method

    method = get_method(plan.method)
    comp = 8 if any(t.compute_dtype == "F64" for t in plan.tensors) else 4
    n_inputs = max((len(t.inputs) for t in plan.tensors if t.method != "copy"), default=0)
    computed = any(t.method != "copy" for t in plan.tensors)
    temps = method.temporaries(n_inputs) if computed else 0
    slabs = plan.working_copies * (plan.chunk_elems * comp + 8) if computed else 0
    return (plan.chunk_in_bytes + ALIGN * len(plan.sources) + plan.chunk_out_bytes + slabs
            + temps * plan.chunk_elems * comp)


def check_device_memory(plan: Plan, device: str) -> None:
    """Refuse, before any work, a CUDA device with too little free memory for `plan`."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return  # no CUDA: `api._check_run_options` has refused the device already
    need = device_bytes(plan)
    free, total = torch.cuda.mem_get_info(torch.device(device))
    if need > free * DEVICE_HEADROOM:
        raise ConfigError(
            f"--device {device}: this merge needs {format_size(need)} of device memory (one chunk's "
            f"inputs, output and compute buffers), but {format_size(free)} of {format_size(total)} is free; "
            "lower --memory-budget (chunks shrink with it) or use --device cpu")
