"""Damaged NPO weight files and settings that make Self-NPO meaningless are refused by the loader
node, as a user meets them, with the file and the entry named (issue 12, B7). Before: NaN weights
gave black images in `separate` residency with no error, a LoRA whose ranks disagree gave a raw shape
error in batched residency and a silently dropped layer in separate, and strength 0 quietly ran
plain CFG."""
from __future__ import annotations

import math
import re

import pytest
import torch

import npo_files
from comfy_selfnpo.nodes.negative_model import SelfNPONegativeModelLoader
from comfy_selfnpo.npo.weights import NPOFormatError, effective_weight


def _load(model, name, strength=1.0, merge_weight=0.0, base=None):
    """What ComfyUI runs for a 'Self-NPO Negative Model' node choosing self_npo/<name>."""
    out = SelfNPONegativeModelLoader.execute(model=model, npo_weights=f"self_npo/{name}", strength=strength,
                                             merge_weight=merge_weight, base_model=base)
    return out.result


def _kohya(model):
    return npo_files.kohya_state_dict(npo_files.make_npo_offset(model, seed=1), model)


def _unet_key(tensors, suffix):
    return sorted(k for k in tensors if k.startswith("lora_unet_") and k.endswith(suffix))[2]


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_a_lora_with_non_finite_values_is_refused_naming_the_file_and_the_first_bad_key(comfy_dirs, tiny, bad_value):
    model = tiny.build_model("sd15", seed=3)
    tensors = _kohya(model)
    first, second = sorted(k for k in tensors if k.endswith(".lora_up.weight"))[3:5]
    for key in (second, first):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = bad_value
    npo_files.write(comfy_dirs["self_npo"] / "diverged.safetensors", tensors)
    with pytest.raises(NPOFormatError, match=re.escape(f"diverged.safetensors holds NaN/inf values in {first} "
                                                       "(and 1 more tensors)")):
        _load(model, "diverged.safetensors")


def test_non_finite_offsets_and_whole_models_of_a_dit_are_refused_too(comfy_dirs, tiny):
    model = tiny.build_model("wan21", seed=3)
    changes = npo_files.dense_change(model, seed=1)
    offset = {k: v.clone() for k, v in npo_files.offset_every_parameter_state_dict(changes).items()}
    offset["diffusion_model.blocks.1.modulation.diff"][0, 2, 5] = math.nan
    npo_files.write(comfy_dirs["self_npo"] / "offset.safetensors", offset)
    with pytest.raises(NPOFormatError, match=r"offset\.safetensors holds NaN/inf values in "
                                             r"diffusion_model\.blocks\.1\.modulation\.diff: the file is damaged"):
        _load(model, "offset.safetensors")
    whole = npo_files.full_model_state_dict(model, changes, "bare")
    whole["head.head.weight"] = whole["head.head.weight"].to(torch.bfloat16)
    whole["head.head.weight"][3] = math.inf
    npo_files.write(comfy_dirs["self_npo"] / "whole.safetensors", whole)
    with pytest.raises(NPOFormatError, match=r"whole\.safetensors holds NaN/inf values in head\.head\.weight"):
        _load(model, "whole.safetensors")


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_a_lora_whose_inner_ranks_disagree_is_refused_naming_the_layer_and_both_shapes(comfy_dirs, tiny, layout):
    model = tiny.build_model("sd15", seed=3)
    offset = npo_files.make_npo_offset(model, seed=1)
    if layout == "kohya":
        tensors, down_suffix = _kohya(model), ".lora_down.weight"
    else:
        tensors, down_suffix = npo_files.peft_state_dict(offset, model), ".lora_A.weight"
    key = _unet_key(tensors, down_suffix) if layout == "kohya" else sorted(k for k in tensors if k.endswith(down_suffix))[2]
    tensors[key] = tensors[key][:3]  # rank 3 down under a rank-4 up
    npo_files.write(comfy_dirs["self_npo"] / "ranks.safetensors", tensors)
    stem = key[: -len(down_suffix)]
    with pytest.raises(NPOFormatError, match=re.escape(f"ranks.safetensors: LoRA layer '{stem}': the up matrix")
                       + r" \(\d+, 4(, 1, 1)?\) has inner rank 4 but the down matrix \(3, [\d, ]+\) has rank 3"):
        _load(model, "ranks.safetensors")


def test_a_lora_layer_missing_a_matrix_is_refused(comfy_dirs, tiny):
    model = tiny.build_model("sd15", seed=3)
    tensors = _kohya(model)
    key = _unet_key(tensors, ".lora_down.weight")
    del tensors[key]
    npo_files.write(comfy_dirs["self_npo"] / "cut.safetensors", tensors)
    with pytest.raises(NPOFormatError, match=re.escape(f"LoRA layer '{key[: -len('.lora_down.weight')]}' has no "
                                                       "down matrix")):
        _load(model, "cut.safetensors")


def test_strength_zero_is_refused_as_plain_cfg_unless_the_merge_weight_still_changes_the_model(comfy_dirs, tiny):
    model = tiny.build_model("sd15", seed=3)
    npo_files.write(comfy_dirs["self_npo"] / "npo.safetensors", _kohya(model))
    with pytest.raises(ValueError, match="strength is 0: the negative model would equal the positive model, so "
                                         "the guidance would be plain CFG"):
        _load(model, "npo.safetensors", strength=0.0)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        _load(model, "npo.safetensors", strength=math.nan)
    # β ≠ 0 towards another base still makes a different negative: θ_neg = θ_pos − β·(θ_pos − θ_base)
    base = tiny.build_model("sd15", seed=4)
    negative, report = _load(model, "npo.safetensors", strength=0.0, merge_weight=0.5, base=base)
    key = "diffusion_model.out.2.weight"
    pos, bas = model.model.state_dict()[key], base.model.state_dict()[key]
    torch.testing.assert_close(effective_weight(negative, key), 0.5 * pos + 0.5 * bas)
    assert "strength 0, merge weight 0.5" in report


def _refused(dirs, model, name: str, tensors: dict, message: str) -> None:
    """The loader node refuses self_npo/<name> holding `tensors` with an error starting with `message`."""
    npo_files.write(dirs["self_npo"] / name, tensors)
    with pytest.raises(NPOFormatError, match=re.escape(message)):
        _load(model, name)


def test_a_lora_alpha_that_is_not_one_number_is_refused_naming_the_file_and_key(comfy_dirs, tiny):
    model = tiny.build_model("sd15", seed=3)
    tensors = _kohya(model)
    key = _unet_key(tensors, ".alpha")
    tensors[key] = torch.tensor([2.0, 2.0, 2.0])  # core: "a Tensor with 3 elements cannot be converted to Scalar"
    _refused(comfy_dirs, model, "alpha.safetensors", tensors,
             f"alpha.safetensors: the LoRA alpha {key} holds 3 numbers (shape (3,)), but an alpha is one number")


@pytest.mark.parametrize("suffix", [".lora_up.weight", ".lora_down.weight"])
def test_integer_lora_factors_are_refused_naming_the_file_key_and_dtype(comfy_dirs, tiny, suffix):
    model = tiny.build_model("sd15", seed=3)
    tensors = _kohya(model)
    key = _unet_key(tensors, suffix)
    tensors[key] = (tensors[key] * 100).round().to(torch.int8)  # an int8-quantized factor, its scale elsewhere
    _refused(comfy_dirs, model, "int8.safetensors", tensors,
             f"int8.safetensors: {key} is stored as int8, not as floating-point numbers")


def test_two_peft_spellings_of_one_lora_entry_are_refused_naming_both_keys(comfy_dirs, tiny):
    model = tiny.build_model("sd15", seed=3)
    tensors = npo_files.peft_state_dict(npo_files.make_npo_offset(model, seed=1), model)
    key = sorted(k for k in tensors if k.endswith(".lora_A.weight"))[2]
    stem = key[: -len(".lora_A.weight")]
    tensors[f"{stem}.lora_A.default.weight"] = tensors[key] * 2  # which one is meant? (one was dropped silently)
    tensors[f"{stem}.lora_B.default.weight"] = tensors[f"{stem}.lora_B.weight"].clone()
    _refused(comfy_dirs, model, "spellings.safetensors", tensors,
             f"spellings.safetensors: '{stem}.lora_A.default.weight' and '{key}' are both the down entry of "
             f"LoRA layer '{stem}'")


@pytest.mark.parametrize("kind", ["kohya_lora", "offset", "full_model_ldm"])
def test_a_file_that_changes_nothing_is_refused_once_by_the_loader(comfy_dirs, tiny, kind):
    model = tiny.build_model("sd15", seed=3)
    offset = npo_files.make_npo_offset(model, seed=1)
    empty = npo_files.LowRankOffset({k: (torch.zeros_like(up), down, alpha) for k, (up, down, alpha)
                                     in offset.factors.items()})
    npo_files.write(comfy_dirs["self_npo"] / "untrained.safetensors", npo_files.WRITERS[kind](empty, model))
    what = ("the whole model in it equals the positive model's checkpoint weights" if kind.startswith("full") else
            "every change in it is zero")
    with pytest.raises(NPOFormatError, match=re.escape(f"untrained.safetensors: {what}") + ".*Self-NPO guidance "
                                             "would be plain CFG"):
        _load(model, "untrained.safetensors")
