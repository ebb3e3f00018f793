"""Training through model code written for inference only.

Several ComfyUI blocks update tensors in place (`x += ...` in the Flux/Chroma/HunyuanVideo double and
single blocks, LTXV). Autograd then finds a tensor it saved for the backward pass changed and stops
("modified by an inplace operation"). The general answer, for any model and without touching its
code: let autograd save its own copy of every intermediate tensor it keeps (`saved_tensor_copies`),
so an in-place update no longer reaches what the backward pass reads. Parameters are kept as they
are (nothing updates them during a forward pass). A copy costs memory bandwidth, so it is switched
on only for models that need it: `needs_saved_copies` finds out with one forward/backward pass.
"""
from __future__ import annotations

import contextlib

import torch

INPLACE_ERROR = "modified by an inplace operation"


def _pack(t: torch.Tensor):
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


def _unpack(t: torch.Tensor):
    return t


@contextlib.contextmanager
def saved_tensor_copies(enabled: bool = True):
    if not enabled:
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def needs_saved_copies(forward_and_loss) -> bool:
    """Run `forward_and_loss()` (a forward pass returning a scalar) and its backward once; True when
    autograd trips over an in-place update, False when it passes. Other errors propagate."""
    try:
        forward_and_loss().backward()
    except RuntimeError as e:
        if INPLACE_ERROR not in str(e):
            raise
        return True
    return False
