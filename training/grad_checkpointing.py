"""Gradient checkpointing for ComfyUI's diffusion models: recompute block activations in the backward
pass instead of storing them (torch.utils.checkpoint, non-reentrant). ComfyUI's own `checkpoint()`
helper is a no-op, so block forwards are wrapped for the duration of a `with` block."""
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


@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool = True):
    """Recompute block activations during backward (torch.utils.checkpoint, non-reentrant) instead
    of storing them. ComfyUI's own `checkpoint()` helper is a no-op, so we wrap block forwards."""
    if not enabled:
        yield
        return
    import torch.utils.checkpoint as cp

    patched = []
    for block in checkpoint_blocks(diffusion_model):
        original = block.forward

        def fwd(*args, _orig=original, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            return cp.checkpoint(lambda a, k: _orig(*a, **k), args, kwargs, use_reentrant=False)

        block.forward = fwd
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.forward  # back to the class's forward
