"""Running the pack's real training code on fake tensors (the planner, planner.py): tensors that have
shapes, dtypes and devices but no memory, so a step of a 14 B-parameter model runs on a CPU in a few
hundred MB, and a tracker adds up the bytes the tensors would hold.

`HostFakeMode` is torch's FakeTensorMode with one difference: what the trainer computes on the host
(grid indices, timesteps, random draws of integers and float64 levels, the noise schedule) stays real,
because the step's control flow reads those values (`int(n_steps.max())`, boolean masks). The rule:
  * an op whose inputs are all real tensors runs for real;
  * a factory (no tensor inputs) makes an integer, boolean or float64 tensor for real, anything
    else (weights, noise, latents) fake;
  * a real boolean mask indexing a fake tensor is turned into real positions first (a fake tensor
    cannot be indexed by a mask: its output shape would depend on values);
  * `.item()` of a fake tensor (the fp16 gradient scaler's inf check) reads 0: fake values do not exist.
Only fake tensors are counted: they are what would live on the accelerator.
"""
from __future__ import annotations

import contextlib
import sys
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves

_aten = torch.ops.aten
_HOST_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float64)
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}


def _factory_dtype(func, args, kwargs) -> torch.dtype:
    """The dtype a factory op (no tensor inputs) makes."""
    dtype = kwargs.get("dtype")
    if dtype is not None:
        return dtype
    if func._overloadpacket in (_aten.randint, _aten.randperm):
        return torch.int64
    if func._overloadpacket is _aten.arange and all(isinstance(a, int) for a in args):
        return torch.int64
    return torch.get_default_dtype()


def _masks_as_positions(indices):
    out = []
    for index in indices:
        if isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool:
            out += list(index.nonzero().unbind(1))
        else:
            out.append(index)
    return out


class MemoryTracker:
    """Bytes held by live fake tensors (each storage once): now, at the peak, and which storages
    were alive at the peak (to split the peak into weights, gradients, ... afterwards)."""

    def __init__(self):
        self.live: dict[int, int] = {}  # storage key -> bytes
        self.now = self.peak = 0
        self.at_peak: frozenset = frozenset()
        self.phase = self.peak_phase = ""  # what the caller says it is running (set from outside)
        self._snapshot_at = 0

    def reset_peak(self) -> None:
        self.peak, self._snapshot_at = self.now, 0
        self.at_peak, self.peak_phase = frozenset(self.live), self.phase

    @staticmethod
    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = nbytes = storage.nbytes()
        weakref.finalize(storage, self._free, key)
        self.now += nbytes
        if self.now > self.peak:
            self.peak = self.now
            if self.now > self._snapshot_at * 1.001:  # the split of the peak, to 0.1 %
                self.at_peak, self._snapshot_at = frozenset(self.live), self.now
            self.peak_phase = self.phase

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


class FlopTally:
    """FLOP of the fake ops, by torch.utils.flop_counter's formulas (matmuls, convolutions, attention).
    Not its FlopCounterMode: that mode's module tracker holds on to the tensors of every module call,
    which defeats gradient checkpointing (measured on a reduced SD1.5 LoRA step: 147 MB instead of 58)."""

    def __init__(self):
        from torch.utils.flop_counter import flop_registry

        self.formulas = dict(flop_registry)
        # the CPU build's fused attention kernels stand for the GPU's (same math, same FLOP)
        self.formulas[_aten._scaled_dot_product_flash_attention_for_cpu] = \
            flop_registry[_aten._scaled_dot_product_flash_attention]
        self.formulas[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            flop_registry[_aten._scaled_dot_product_flash_attention_backward]
        self.total = 0

    def add(self, func, args, kwargs, out) -> None:
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)


class HostFakeMode(FakeTensorMode):
    """See the module docstring. `tracker` (a MemoryTracker) sees every fake tensor an op makes,
    `flops` (a FlopTally) every op on fake tensors."""

    def __init__(self, tracker: MemoryTracker | None = None, flops: FlopTally | None = None):
        super().__init__(allow_non_fake_inputs=True)
        self.tracker, self.flops = tracker, flops
        self._depth = 0  # ops the fake mode runs inside an op (decompositions) are that op's own business

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._depth += 1
        try:
            return self._dispatch(func, types, args, kwargs or {})
        finally:
            self._depth -= 1

    def _dispatch(self, func, types, args, kwargs):
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if not any(isinstance(t, FakeTensor) for t in tensors):
            if tensors or _factory_dtype(func, args, kwargs) in _HOST_DTYPES:
                return func(*args, **kwargs)  # never through the fake path: it must not touch a generator
            out = super().__torch_dispatch__(func, types, args, kwargs)
        else:
            if func is _aten._local_scalar_dense.default:
                return 0.0 if tensors[0].dtype.is_floating_point else 0
            if func in _INDEX_OPS:
                args = (args[0], _masks_as_positions(args[1]), *args[2:])
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.flops is not None and self._depth == 1:
                self.flops.add(func, args, kwargs, out)
        if self.tracker is not None and self._depth == 1:
            for t in tree_leaves(out):
                if isinstance(t, FakeTensor):
                    self.tracker.add(t)
        return out


@contextlib.contextmanager
def target_attention(name: str = "pytorch"):
    """ComfyUI picks its attention function by device when it starts (on a CPU: split or sub-quadratic
    attention, which hold the whole attention matrix). Trace what a CUDA GPU runs instead: PyTorch's
    scaled_dot_product_attention (`attention_pytorch`), in every model module that imported it."""
    import comfy.ldm.modules.attention as attention

    chosen = getattr(attention, f"attention_{name}")
    current = {attention.optimized_attention, attention.optimized_attention_masked}
    swapped = []
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("comfy"):
            continue
        for attr in ("optimized_attention", "optimized_attention_masked"):
            if getattr(module, attr, None) in current:
                swapped.append((module, attr, getattr(module, attr)))
                setattr(module, attr, chosen)
    try:
        yield f"attention_{name} (torch scaled_dot_product_attention)"
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)


def _cast_fake_module(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for name, t in table.items():
                if t is None or dtype is None or not t.is_floating_point() or t.dtype == dtype:
                    continue
                cast = t.detach().to(dtype)
                table[name] = torch.nn.Parameter(cast, t.requires_grad) if isinstance(t, torch.nn.Parameter) else cast
    return module


@contextlib.contextmanager
def fake_module_casts():
    """`Module.to(...)` of a module with fake parameters: torch 2.13 swaps each parameter object in
    place there (torch.utils.swap_tensors), which refuses fake tensors that fake-tensor bookkeeping
    holds weak references to. Inside this block such a module's floating-point tensors are replaced
    by cast copies instead (all fake tensors live on the CPU, so there is no device to move to)."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if not any(isinstance(p, FakeTensor) for p in self.parameters()):
            return original(self, *args, **kwargs)
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        return _cast_fake_module(self, dtype)

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original
