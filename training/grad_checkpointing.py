"""Gradient checkpointing for ComfyUI's diffusion models: a block's intermediate tensors are not kept
for the backward pass but recomputed from its inputs when the backward pass reaches it.

ComfyUI's own `checkpoint()` helper is a no-op, so block forwards are wrapped for the duration of a
`with` block. The recomputation is this module's own rather than torch.utils.checkpoint's: several
ComfyUI blocks update tensors in place (`img += ...` in the Flux/Chroma/HunyuanVideo and LTXV blocks),
and torch's recomputation keeps references to tensors it then sees updated — measured on the tiny
Chroma: gradients off by 0.2 %, silently. Here the recomputation runs on a pristine copy of the
block's inputs and keeps a copy of each tensor it saves, so every family gets exactly the gradients
of training without checkpointing (tested).
"""
from __future__ import annotations

import contextlib

import torch


def checkpoint_blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks whose activations are recomputed in the backward pass: the UNet's input, middle
    and output blocks; for other architectures the entries of every top-level ModuleList."""
    blocks = []
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        # ComfyUI's UNet runs a TimestepEmbedSequential layer by layer (forward_timestep_embed), never
        # through the sequence's own forward: wrap its layers (ResBlocks, SpatialTransformers, ...)
        seqs = list(diffusion_model.input_blocks) + list(diffusion_model.output_blocks)
        if getattr(diffusion_model, "middle_block", None) is not None:
            seqs.append(diffusion_model.middle_block)
        for seq in seqs:
            blocks += list(seq) if isinstance(seq, torch.nn.Sequential) else [seq]
    else:
        for child in diffusion_model.children():
            if isinstance(child, torch.nn.ModuleList):
                blocks += list(child)
    return blocks


def _copy(value):
    """Tensors cloned and detached (keeping whether they require grad), dicts copied one level deep
    (ComfyUI's transformer_options is updated between blocks), anything else as is."""
    if torch.is_tensor(value):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, dict):
        return dict(value)
    return value


def _recompute_input(value):
    """An input of the recomputation, in the forward pass's form: a non-leaf tensor (as `_fresh`
    made it), so the block may update it in place."""
    value = _copy(value)
    return value.clone() if torch.is_tensor(value) else value


def _fresh(value):
    """The forward pass's input: a differentiable clone of a tensor, so in-place updates inside the
    block cannot reach the caller's tensor (or the copy kept for the recomputation)."""
    return value.clone() if torch.is_tensor(value) else value


def _keep(t: torch.Tensor):
    return t if isinstance(t, torch.nn.Parameter) else t.detach().clone()


class _Recomputation:
    """One call of a checkpointed block: its saved tensors become numbers in the forward pass and are
    recomputed — all of the block's at once, then released as the backward pass uses them."""

    def __init__(self, forward, args, kwargs):
        self.forward = forward
        self.args = [_copy(a) for a in args]
        self.kwargs = {k: _copy(v) for k, v in kwargs.items()}
        device = next((t.device for t in [*args, *kwargs.values()] if torch.is_tensor(t)), torch.device("cpu"))
        self.device_type = device.type
        self.autocast = (torch.is_autocast_enabled(self.device_type), torch.get_autocast_dtype(self.device_type))
        self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        self.device = device
        self.count, self.saved, self.unpacked = 0, None, 0

    def pack(self, t) -> int:
        self.count += 1
        return self.count - 1

    def unpack(self, index: int):
        if self.saved is None:
            self._recompute()
        value = self.saved[index]
        self.unpacked += 1
        if self.unpacked == self.count:
            self.saved = None  # the block's part of the backward pass is done: free its activations
        return value

    def _recompute(self) -> None:
        saved = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.rng[0])
            if self.rng[1] is not None:
                torch.cuda.set_rng_state(self.rng[1], self.device)
            enabled, dtype = self.autocast
            with torch.enable_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled), \
                    torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(_keep(t)), lambda _: None):
                self.forward(*[_recompute_input(a) for a in self.args],
                             **{k: _recompute_input(v) for k, v in self.kwargs.items()})
        if len(saved) != self.count:
            raise RuntimeError(f"gradient checkpointing: the recomputation saved {len(saved)} tensors, the forward "
                               f"pass {self.count}; this block does not compute the same way twice")
        self.saved = saved


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        recomputation = _Recomputation(forward, args, kwargs)
        with torch.autograd.graph.saved_tensors_hooks(recomputation.pack, recomputation.unpack):
            return forward(*[_fresh(a) for a in args], **{k: _fresh(v) for k, v in kwargs.items()})
    return run


@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool = True):
    """Recompute block activations during backward instead of storing them (see the module docstring)."""
    if not enabled:
        yield
        return
    patched = []
    for block in checkpoint_blocks(diffusion_model):
        block.forward = _checkpointed(block.forward)
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's forward
