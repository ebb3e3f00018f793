"""Checks on an NPO weight file as it is read, before it meets a model: damaged files are refused
with the file and the entry named, instead of becoming black images or silently missing layers."""
from __future__ import annotations

from collections import defaultdict

import torch

from .keys import LYCORIS_LAYERS, lora_role, lycoris_algorithm, offset_param
from .report import NPOFormatError, file_name

_CHUNK = 1 << 24  # elements checked at a time: bounded extra memory on multi-GB files


def _is_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if chunk.element_size() == 1:
            chunk = chunk.float()  # float8 has no isfinite kernel
        if not bool(torch.isfinite(chunk).all()):
            return False
    return True


def check_finite(tensors: dict, source: str) -> None:
    """Refuse NaN/inf anywhere in the file, naming the first such tensor (in key order)."""
    bad = [key for key in sorted(tensors) if not _is_finite(tensors[key])]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise NPOFormatError(
            f"{file_name(source)} holds NaN/inf values in {bad[0]}{more}: the file is damaged (a training run "
            "that diverged, or a broken save or download). It cannot be used as NPO weights; export the "
            "weights again from a good checkpoint, or retrain.")


def check_number_types(tensors: dict, source: str, skip=lambda key: False) -> None:
    """LoRA matrices and offsets hold floating-point numbers, and a LoRA's alpha is one number.
    Integer factors (an int8-quantized LoRA) carry a scale the file format does not say: read as they
    are they would be a change hundreds of times too large."""
    for key in sorted(tensors):
        if skip(key):
            continue
        role = lora_role(key)
        tensor = tensors[key]
        if role is not None and role[1] == "alpha":
            if tensor.numel() != 1:
                raise NPOFormatError(
                    f"{file_name(source)}: the LoRA alpha {key} holds {tensor.numel()} numbers (shape "
                    f"{tuple(tensor.shape)}), but an alpha is one number; the file was written by a broken tool: "
                    "export it again.")
        elif (role is not None or offset_param(key) is not None) and not tensor.is_floating_point():
            raise NPOFormatError(
                f"{file_name(source)}: {key} is stored as {str(tensor.dtype).replace('torch.', '')}, not as "
                "floating-point numbers (a quantized LoRA?); its scale is not in the file, so it cannot be "
                "used as NPO weights. Use a float16/bfloat16/float32 export.")


def check_lora_layers(tensors: dict, source: str, skip=lambda key: False) -> None:
    """Every LoRA layer has both matrices, each once, and their inner ranks agree (up: out x r,
    down: r x in)."""
    layers: dict[str, dict[str, str]] = defaultdict(dict)
    for key in sorted(tensors):
        split = None if skip(key) else lora_role(key)
        if split is None:
            continue
        stem, role = split
        if role in layers[stem]:  # two spellings of one entry (.lora_A.weight and .lora_A.default.weight)
            raise NPOFormatError(
                f"{file_name(source)}: '{layers[stem][role]}' and '{key}' are both the {role} entry of LoRA "
                f"layer '{stem}' (two spellings of one layer); a file may hold each once, and which one is "
                "meant is not known. Remove one of them and save the file again.")
        layers[stem][role] = key
    for stem, roles in sorted(layers.items()):
        if lycoris_algorithm(roles):
            _check_lycoris_layer(stem, tensors, roles, source)
            continue
        missing = [role for role in ("up", "down") if role not in roles]
        if missing:
            have = ", ".join(sorted(roles.values()))
            raise NPOFormatError(
                f"{file_name(source)}: LoRA layer '{stem}' has no {' and no '.join(missing)} matrix (it has "
                f"only {have}); the file is incomplete or damaged: export it again.")
        _check_ranks(stem, tensors, roles, source)


def _check_ranks(stem: str, tensors: dict, roles: dict, source: str) -> None:
    up, down = tensors[roles["up"]], tensors[roles["down"]]
    chain = [("up", up, up.shape[1] if up.ndim >= 2 else None)]
    if "mid" in roles:
        mid = tensors[roles["mid"]]
        chain += [("mid", mid, mid.shape[0]), ("mid", mid, mid.shape[1] if mid.ndim >= 2 else None)]
    chain.append(("down", down, down.shape[0] if down.ndim >= 1 else None))
    for (name_a, a, rank_a), (name_b, b, rank_b) in zip(chain[::2], chain[1::2]):
        if rank_a is None or rank_a != rank_b:
            raise NPOFormatError(
                f"{file_name(source)}: LoRA layer '{stem}': the {name_a} matrix {tuple(a.shape)} has inner rank "
                f"{rank_a} but the {name_b} matrix {tuple(b.shape)} has rank {rank_b}; the ranks must agree. "
                "The file is damaged or was written by a broken tool: export it again.")



def _check_lycoris_layer(stem: str, tensors: dict, roles: dict, source: str) -> None:
    """A LoHa/LoKr layer has every part (LYCORIS_LAYERS) and each low-rank pair's inner ranks agree;
    ComfyUI's adapters do the rest of the math."""
    for part in LYCORIS_LAYERS[lycoris_algorithm(roles)]:
        if not any(all(role in roles for role in alternative) for alternative in part):
            want = " or ".join("+".join(alternative) for alternative in part)
            raise NPOFormatError(
                f"{file_name(source)}: LyCORIS layer '{stem}' has no {want} (it has only "
                f"{', '.join(sorted(roles))}); the file is incomplete or damaged: export it again.")
        for pair in part:
            if len(pair) == 2 and all(role in roles for role in pair):
                a, b = tensors[roles[pair[0]]], tensors[roles[pair[1]]]
                if a.ndim < 2 or b.ndim < 1 or a.shape[1] != b.shape[0]:
                    raise NPOFormatError(
                        f"{file_name(source)}: LyCORIS layer '{stem}': {pair[0]} {tuple(a.shape)} and {pair[1]} "
                        f"{tuple(b.shape)} have different inner ranks; the file is damaged: export it again.")
