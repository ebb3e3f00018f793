"""Training a model larger than the GPU: ComfyUI loads the weights that fit and streams the others in
layer by layer at every forward (its low-VRAM loading; core's trainer calls it "offloading").

The base model's weights never train here (LoRA trains adapters beside them; full mode trains a
separate copy), so the trainer lets ComfyUI load the base partially. One thing must change for the
backward pass of a LoRA student: a streamed layer's weight exists on the GPU only for the duration of
its forward call (ComfyUI may reuse that buffer for the next layer's weight), yet autograd would keep
it for the input gradient — wrong values if the buffer is reused, and the whole model's weights on the
GPU if it is not. So each streamed layer runs as a small checkpoint: its forward without autograd,
keeping only its input, and in the backward pass the weight is streamed in again to compute the input
gradient (what core's trainer does for its offloaded layers; tested equal to a fully loaded model).
"""
from __future__ import annotations

import contextlib

import torch

_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class _RecastInBackward(torch.autograd.Function):
    """y = layer(x) with only x saved; backward runs the layer again (streaming its weight in again)."""

    @staticmethod
    def forward(ctx, x, layer_forward):
        ctx.save_for_backward(x)
        ctx.layer_forward = layer_forward
        with torch.no_grad():
            return layer_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(ctx.layer_forward(x), x, grad_out)
        return grad_x, None


def streamed_layers(diffusion_model: torch.nn.Module, device) -> list[torch.nn.Module]:
    """The layers ComfyUI casts in at every call because its loader left their weight off the compute
    device (`prev_comfy_cast_weights` is the loader's mark on the layers it switched to casting;
    a weight on another device than `device` says the same)."""
    device = torch.device(device)
    return [m for m in diffusion_model.modules()
            if isinstance(m, _LAYER_TYPES) and getattr(m, "comfy_cast_weights", False)
            and (hasattr(m, "prev_comfy_cast_weights") or m.weight.device != device)]


def _checkpointed(layer_forward):
    def forward(x, *args, **kwargs):
        if args or kwargs:  # not seen in ComfyUI's models; kept exact all the same
            return _RecastInBackward.apply(x, lambda inp: layer_forward(inp, *args, **kwargs))
        return _RecastInBackward.apply(x, layer_forward)
    return forward


@contextlib.contextmanager
def recast_in_backward(layers: list[torch.nn.Module]):
    """Inside the block, `layers` keep no weight for the backward pass (see the module docstring).
    Their forward hooks (the LoRA adapters) still run, outside the checkpoint, so adapter gradients
    flow as usual."""
    originals = []
    for layer in layers:
        originals.append((layer, layer.__dict__.get("forward")))
        layer_forward = layer.forward
        layer.forward = _checkpointed(layer_forward)
    try:
        yield
    finally:
        for layer, own in originals:
            if own is None:
                del layer.forward
            else:
                layer.forward = own
