"""The trainable adapter kinds (`adapter`: lora | loha | lokr), one row each: how a training module of
ComfyUI's own is made for a layer, its tensors under the pack's and the files' names, and its metadata.

torch-free at import (torch and ComfyUI are imported where a row is used): the config and the CLI's
argument parser read the table's names as the `adapter` choices, so a new kind is one row here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


def full_rank(shape) -> int:
    """The largest rank a LoRA on a weight of this shape can use: min(out, in·kernel)."""
    return min(shape[0], math.prod(shape[1:]))


def _lora_create(shape, rank: int, alpha: float, gen: torch.Generator):
    """Core's LoraDiff with kohya's initialisation (down ~ kaiming-uniform(a=√5), up = 0) drawn from
    the run's generator. A rank above what the layer can use is capped there, alpha scaled along so
    that the scale alpha/rank is unchanged."""
    import torch
    from comfy.weight_adapter.lora import LoraDiff

    if rank > full_rank(shape):
        rank, alpha = full_rank(shape), alpha * full_rank(shape) / rank
    in_dim = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform(a=√5) bound
    down = (torch.rand((rank, in_dim), generator=gen) * 2 - 1) * bound
    return LoraDiff((torch.zeros(shape[0], rank), down, float(alpha), None, None, None))


def _core_create(adapter_class: str):
    """Core's own create_train (its initialisation, on the RNG the caller seeded)."""
    def create(shape, rank: int, alpha: float, gen: torch.Generator):
        import comfy.weight_adapter as wa
        import torch

        stand_in = torch.empty(()).expand(*shape)  # create_train reads only the weight's shape and device
        return getattr(wa, adapter_class).create_train(stand_in, rank=rank, alpha=float(alpha))
    return create


def _loha_bypass(module):
    """Core's training LohaDiff has no bypass h() (it only patches weights); its inference twin
    LoHaAdapter has, and given the training module's own Parameters autograd reaches them."""
    from comfy.weight_adapter import LoHaAdapter

    weights = (module.hada_w1_a, module.hada_w1_b, float(module.alpha), module.hada_w2_a, module.hada_w2_b,
               None, None, None)
    return LoHaAdapter(set(), weights)


def _lora_file_tensors(layer) -> dict[str, torch.Tensor]:
    """kohya's shapes: a convolution's down is [r, in, kh, kw] and its up [out, r, 1, 1] (core's
    LoraDiff keeps both flat)."""
    down, up = layer.down.detach(), layer.up.detach()
    kernel = layer.shape[2:]
    return {"lora_down.weight": down.reshape(down.shape[0], *layer.shape[1:]),
            "lora_up.weight": up.reshape(*up.shape, *[1] * len(kernel))}


@dataclass(frozen=True)
class AdapterKind:
    """One trainable adapter of core's: how to make it, and its tensors under the pack's names."""
    name: str
    create: Callable             # (weight shape, rank, alpha, generator) -> core's training module
    params: dict                 # the pack's parameter name -> core's (and the file's) tensor name
    network_module: str          # kohya's ss_network_module for the file's metadata
    bypass: Callable = field(default=lambda module: module)  # the object whose h(x, y) is added to y
    file_tensors: Callable | None = None  # layer -> tensors as written, when not core's as they are


ADAPTERS = {
    "lora": AdapterKind("lora", _lora_create, {"down": "lora_down.weight", "up": "lora_up.weight"},
                        "networks.lora", file_tensors=_lora_file_tensors),
    "loha": AdapterKind("loha", _core_create("LoHaAdapter"),
                        {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
                        "lycoris.kohya", bypass=_loha_bypass),
    "lokr": AdapterKind("lokr", _core_create("LoKrAdapter"), {"lokr_w1": "lokr_w1", "lokr_w2": "lokr_w2"},
                        "lycoris.kohya"),
}
