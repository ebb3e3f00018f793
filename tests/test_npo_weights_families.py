"""NPO weight files for every family (tiny real models from ComfyUI's classes): kohya, PEFT on
ComfyUI's names, PEFT on diffusers' names, offsets of every parameter and whole-model files load
with zero unmatched keys, and the negative model predicts exactly what the base model with the
change applied by hand predicts. diffusers' own model classes and converters, and ComfyUI's own LoRA
loader, are the references for the names."""
from __future__ import annotations

import pytest
import torch

import comfy.lora
import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd

import npo_files
from comfy_selfnpo import tiny_models
from comfy_selfnpo.npo.separate import materialize_independent_copy
from comfy_selfnpo.npo.weights.names import parameter_names
from comfy_selfnpo.npo.weights import effective_weight, make_negative_model, npo_weights_from_state_dict

DIT_KINDS = tiny_models.DIT_KINDS
ETA = 0.7
_BUILT = {}


@pytest.fixture(scope="module", autouse=True)
def _release_builds():
    yield
    _BUILT.clear()


def _setup(kind):
    """(MODEL, its processed conditioning, a latent, sigma), built once per kind for this module."""
    if kind not in _BUILT:
        ckpt = tiny_models.build_checkpoint(kind, seed=3)
        x = torch.randn(tiny_models.family(kind).sample_latent, generator=torch.Generator().manual_seed(5))
        sigma = ckpt.model.get_model_object("model_sampling").percent_to_sigma(0.4)
        cond = comfy.sampler_helpers.convert_cond(ckpt.clip.encode_from_tokens_scheduled(ckpt.clip.tokenize("a red cube")))
        conds = comfy.samplers.process_conds(ckpt.model.model, x, {"positive": cond}, x.device, latent_image=x, seed=0)
        _BUILT[kind] = (ckpt.model, conds["positive"], x, torch.tensor([sigma]))
    return _BUILT[kind]


@torch.no_grad()
def _predict(patcher, conds, x, sigma):
    """The model's prediction through ComfyUI's own path, with the patcher's weights loaded."""
    comfy.model_management.load_models_gpu([patcher])
    patcher.model.current_patcher = patcher
    return comfy.samplers.calc_cond_batch(patcher.model, [conds], x, sigma, patcher.model_options)[0]


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _non_leaf_parameters(model) -> set[str]:
    """Parameters held by a module that has sub-modules (Wan's blocks.N.modulation, LTXV's
    scale_shift_table): ComfyUI's ModelPatcher.load patches only leaf modules' parameters, so a
    patch on these is not applied when ComfyUI loads the clone; the pack's separate residency
    (materialize_independent_copy) bakes every patch into its own copy and is what samples them."""
    out = set()
    for name, module in model.model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if own and len(own) != len(list(module.parameters())):
            out |= {f"{name}.{p}" for p in own}
    return out


def _by_hand(kind, expected: dict) -> torch.Tensor:
    """The prediction of a freshly built model with the `expected` weights loaded by hand."""
    _model, conds, x, sigma = _setup(kind)
    return _predict(npo_files.independent_model(tiny_models, kind, 3, expected), conds, x, sigma)


def _assert_negative_is(kind, negative, expected: dict, reference: torch.Tensor):
    """Every changed weight of `negative` equals `expected`, the others the base model's; and its
    prediction equals `reference`, that of the model with `expected` loaded by hand (_by_hand)."""
    model, conds, x, sigma = _setup(kind)
    for key in sorted(set(negative.patches) | set(expected)):
        want = expected.get(key, model.model.state_dict()[key]).float()
        torch.testing.assert_close(effective_weight(negative, key), want, rtol=1e-5, atol=1e-6, msg=key)
    sampled = negative
    if _non_leaf_parameters(model) & set(expected):
        sampled = materialize_independent_copy(negative)
    assert _rel_err(_predict(sampled, conds, x, sigma), reference) < 1e-5
    assert _rel_err(_predict(model, conds, x, sigma), reference) > 1e-3  # the change is visible


def _diffusers_matrices(model, kind) -> set[str]:
    """Model weight matrices diffusers has names for (all of them, but HunyuanVideo 1.5's single
    blocks, which diffusers' 1.5 model does not have)."""
    names = parameter_names(model.model)
    return {names[n].key for n in npo_files.diffusers_shapes(kind) if n.endswith(".weight") and n in names}


LORA_NAMINGS = {
    "kohya": lambda off, model, kind: (npo_files.kohya_state_dict(off, model), off),
    "peft_comfyui_names": lambda off, model, kind: (npo_files.comfy_peft_state_dict(off, model), off),
    "peft_diffusers_names": lambda off, model, kind: npo_files.diffusers_peft_state_dict(off, model, kind),
    "peft_diffusers_names_no_prefix": lambda off, model, kind: npo_files.diffusers_peft_state_dict(off, model, kind, ""),
    "peft_model_prefix": lambda off, model, kind: npo_files.diffusers_peft_state_dict(off, model, kind, "base_model.model."),
}


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_lora_in_every_naming_loads_fully_and_predicts_like_the_change_applied_by_hand(kind):
    model = _setup(kind)[0]
    covered = _diffusers_matrices(model, kind)
    offset = npo_files.lowrank_offset(model, npo_files.matrix_keys(model, lambda k: k in covered), seed=1)
    sd = model.model.state_dict()
    expected = {k: sd[k] + ETA * d for k, d in offset.dense(sd).items()}
    reference = _by_hand(kind, expected)
    for naming, write in LORA_NAMINGS.items():
        tensors, used = write(offset, model, kind)
        assert set(used.factors) == set(offset.factors), naming
        negative, report = make_negative_model(model, npo_weights_from_state_dict(tensors, f"{naming}.safetensors"),
                                               strength=ETA)
        assert report.unmatched == [] and report.patched == len(offset.factors), (naming, report.unmatched[:3])
        _assert_negative_is(kind, negative, expected, reference)


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_offsets_and_whole_models_carry_every_parameter_and_predict_like_the_change_applied_by_hand(kind):
    model = _setup(kind)[0]
    changes = npo_files.dense_change(model, seed=2)
    diffusers_file, diffusers_covered = npo_files.diffusers_full_model_state_dict(model, changes, kind)
    files = {
        "offset": (npo_files.offset_every_parameter_state_dict(changes), "offset", set(changes)),
        "trainer_whole_model": (npo_files.full_model_state_dict(model, changes, "bare"), "full_model", set(changes)),
        "checkpoint_whole_model": (npo_files.full_model_state_dict(model, changes, "checkpoint"), "full_model",
                                   set(changes)),
        "diffusers_whole_model": (diffusers_file, "full_model", diffusers_covered & set(changes)),
    }
    sd = model.model.state_dict()
    references = {}
    for name, (tensors, fmt, changed) in files.items():
        npo = npo_weights_from_state_dict(tensors, f"{name}.safetensors")
        negative, report = make_negative_model(model, npo, strength=ETA)
        assert npo.format == fmt and report.unmatched == [] and report.patched == len(changed), name
        expected = {k: sd[k] + ETA * changes[k] for k in changed}
        if frozenset(changed) not in references:
            references[frozenset(changed)] = _by_hand(kind, expected)
        _assert_negative_is(kind, negative, expected, references[frozenset(changed)])
    # parameters that are neither weight nor bias travel too (Wan's modulation, LTXV's scale_shift_table)
    assert any(not k.endswith((".weight", ".bias")) for k in changes) == (kind in ("wan21", "wan22_5b", "wan22_a14b",
                                                                                   "ltxv"))


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_diffusers_names_cover_every_parameter_of_the_diffusers_model_with_its_shape(kind):
    """The pack's name tables against diffusers' own transformer classes at the same tiny sizes."""
    model = _setup(kind)[0]
    names = parameter_names(model.model)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    unnamed, wrong = [], []
    for name, shape in npo_files.diffusers_shapes(kind).items():
        target = names.get(name) or names.get("transformer." + name)
        if target is None:
            unnamed.append(name)
        elif target.shape(shapes[target.key]) != shape:
            wrong.append(f"{name} {shape} -> {target.describe()}")
    assert wrong == []
    # the tiny HunyuanVideo 1.5 has no ByT5 glyph embedder; everything else has its name
    assert unnamed == ([n for n in npo_files.diffusers_shapes(kind) if n.startswith("context_embedder_2.")]
                       if kind == "hunyuan_video15" else [])


DIFFUSERS_CHECKPOINT_CONVERTERS = {
    "wan21": "convert_wan_transformer_to_diffusers",
    "wan22_5b": "convert_wan_transformer_to_diffusers",
    "ltxv": "convert_ltx_transformer_checkpoint_to_diffusers",
    "sd3": "convert_sd3_transformer_checkpoint_to_diffusers",
}


@pytest.mark.parametrize("kind", sorted(DIFFUSERS_CHECKPOINT_CONVERTERS))
def test_whole_models_converted_by_diffusers_own_code_load_back_as_the_changed_model(kind):
    """diffusers' single-file converters (independent of the pack's tables) turn the changed
    checkpoint into diffusers names; diffusers' own model takes the result, and so does the loader."""
    from diffusers.loaders import single_file_utils

    model = _setup(kind)[0]
    changes = npo_files.dense_change(model, seed=3)
    checkpoint = npo_files.full_model_state_dict(model, changes, "checkpoint")
    converted = getattr(single_file_utils, DIFFUSERS_CHECKPOINT_CONVERTERS[kind])(dict(checkpoint))
    npo_files.diffusers_model(kind).load_state_dict(converted, strict=True)
    negative, report = make_negative_model(model, npo_weights_from_state_dict(converted, "diffusers.safetensors"),
                                           strength=ETA)
    assert report.unmatched == [] and report.patched == len(changes)
    sd = model.model.state_dict()
    expected = {k: sd[k] + ETA * d for k, d in changes.items()}
    _assert_negative_is(kind, negative, expected, _by_hand(kind, expected))


def _hunyuan_original_names(model) -> dict[str, str]:
    """Model key -> HunyuanVideo's original (diffusion-pipe) module name, from ComfyUI's own LoRA
    key map, for the layers diffusers' LoRA converter handles: not the single blocks' linear1 (its
    split assumes the full model's 3072 width) nor the token refiner's qkv (it splits the down matrix
    into thirds too, giving layers whose ranks disagree, which the loader refuses)."""
    import re

    pattern = re.compile(r"diffusion_model\.((double|single)_blocks\.\d+\.(?!linear1)"
                         r"|txt_in\.individual_token_refiner\.blocks\.\d+\.(?!self_attn\.qkv))")
    matrices = set(npo_files.matrix_keys(model))
    return {v: k for k, v in comfy.lora.model_lora_keys_unet(model.model, {}).items()
            if isinstance(v, str) and k.startswith("transformer.") and pattern.match(v) and v in matrices}


WAN_BIAS_LAYERS = ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.2", "head.head")


def _wan_lora_in_original_names(model, offset):
    """ComfyUI-native PEFT layout, plus bias offsets (.diff_b) as lightx2v/CausVid Wan LoRAs have
    them (diffusers turns those into PEFT's lora_B.bias)."""
    out = npo_files.comfy_peft_state_dict(offset, model)
    gen = torch.Generator().manual_seed(8)
    for stem in WAN_BIAS_LAYERS:
        bias = model.model.state_dict()[f"diffusion_model.{stem}.bias"]
        out[f"diffusion_model.{stem}.diff_b"] = torch.randn(bias.shape, generator=gen) * 0.05
    return out


def _hunyuan_lora_in_original_names(model, offset):
    names = _hunyuan_original_names(model)
    out = {}
    for key, (up, down, alpha) in offset.factors.items():
        out[f"{names[key]}.lora_A.weight"] = down
        out[f"{names[key]}.lora_B.weight"] = up * (alpha / down.shape[0])
    return out


LORA_CONVERTERS = {  # kind: (layers, the LoRA in original names, diffusers' converter)
    "wan21": (lambda k, v: v.ndim == 2, _wan_lora_in_original_names, "_convert_non_diffusers_wan_lora_to_diffusers"),
    "wan22_5b": (lambda k, v: v.ndim == 2, _wan_lora_in_original_names, "_convert_non_diffusers_wan_lora_to_diffusers"),
    "hunyuan_video": (None, _hunyuan_lora_in_original_names, "_convert_hunyuan_video_lora_to_diffusers"),
    "hunyuan_video15": (None, _hunyuan_lora_in_original_names, "_convert_hunyuan_video_lora_to_diffusers"),
}


@pytest.mark.parametrize("kind", sorted(LORA_CONVERTERS))
def test_loras_converted_to_diffusers_names_by_diffusers_own_code_mean_the_same_change(kind):
    from diffusers.loaders import lora_conversion_utils

    model = _setup(kind)[0]
    select, write_original, converter = LORA_CONVERTERS[kind]
    sd = model.model.state_dict()
    layers = (npo_files.matrix_keys(model, lambda k: select(k, sd[k])) if select is not None
              else sorted(_hunyuan_original_names(model)))
    offset = npo_files.lowrank_offset(model, layers, seed=4)
    original = write_original(model, offset)
    converted = getattr(lora_conversion_utils, converter)(dict(original))
    assert set(converted).isdisjoint(original)
    assert any(k.endswith(".lora_B.bias") for k in converted) == (kind in ("wan21", "wan22_5b"))
    expected = {k: sd[k] + ETA * d for k, d in offset.dense(sd).items()}
    biases = {k[: -len(".diff_b")] + ".bias": v for k, v in original.items() if k.endswith(".diff_b")}
    expected.update({k: sd[k] + ETA * d for k, d in biases.items()})
    reference = _by_hand(kind, expected)
    for name, tensors in (("original", original), ("diffusers", converted)):
        negative, report = make_negative_model(model, npo_weights_from_state_dict(tensors, name), strength=ETA)
        assert report.unmatched == [] and report.patched == len(layers) + len(biases), name
        _assert_negative_is(kind, negative, expected, reference)


def _comfyui_diffusers_layers(model) -> set[str]:
    """Weight matrices ComfyUI's own LoRA key map reaches under diffusers' "transformer." names."""
    targets = {v if isinstance(v, str) else v[0] for k, v in comfy.lora.model_lora_keys_unet(model.model, {}).items()
               if k.startswith("transformer.")}
    return targets & set(npo_files.matrix_keys(model))


@pytest.mark.parametrize("kind", ["sd3", "chroma", "flux_dev"])
def test_diffusers_loras_on_fused_layers_become_the_slice_patches_comfyui_makes(kind):
    """Where ComfyUI's own loader reads diffusers' "transformer." names, it and the pack give the same
    patches: to_q/to_k/to_v on a fused qkv (or linear1) as slices of its rows; without the prefix
    (PEFT's own state dicts) the pack reads the same file the same way."""
    model = _setup(kind)[0]
    layers = _comfyui_diffusers_layers(model) & _diffusers_matrices(model, kind)
    offset = npo_files.lowrank_offset(model, sorted(layers), seed=5)
    tensors, _ = npo_files.diffusers_peft_state_dict(offset, model, kind)
    comfy_lora, _ = comfy.sd.load_lora_for_models(model, None, tensors, ETA, 0.0)
    bare, _ = npo_files.diffusers_peft_state_dict(offset, model, kind, "")
    for name, npo_tensors in (("transformer.", tensors), ("no prefix", bare)):
        ours, report = make_negative_model(model, npo_weights_from_state_dict(npo_tensors, name), strength=ETA)
        assert report.unmatched == [] and set(ours.patches) == set(comfy_lora.patches), name
        for key in comfy_lora.patches:
            slices = lambda patches: sorted(str(p[3]) for p in patches)
            assert slices(ours.patches[key]) == slices(comfy_lora.patches[key]), key
            torch.testing.assert_close(effective_weight(ours, key), effective_weight(comfy_lora, key))
    fused = [k for k, patches in comfy_lora.patches.items() if any(p[3] is not None for p in patches)]
    assert fused  # the test covers slice patches


def test_lumina2_grouped_query_parts_land_on_their_own_rows():
    """Lumina 2's qkv holds 2 query heads and 1 key and 1 value head of 32: diffusers' attn.to_k (and
    a Z-Image-style attention.to_k) is rows 64..96, not the third of ComfyUI's equal-thirds map."""
    model = _setup("lumina2")[0]
    key = "diffusion_model.layers.0.attention.qkv.weight"
    qkv = model.model.state_dict()[key]
    assert qkv.shape == (128, 64)
    gen = torch.Generator().manual_seed(6)
    up, down = torch.randn(32, 2, generator=gen), torch.randn(2, 64, generator=gen)
    for stem in ("transformer.layers.0.attn.to_k", "layers.0.attention.to_k"):
        tensors = {f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up}
        negative, report = make_negative_model(model, npo_weights_from_state_dict(tensors, stem))
        assert report.unmatched == [] and report.patched == 1
        expected = qkv.clone()
        expected[64:96] += up @ down
        torch.testing.assert_close(effective_weight(negative, key), expected)


@pytest.mark.parametrize("kind", ["wan21", "ltxv"])
def test_comfyui_own_lora_loader_applies_the_offset_layout_for_every_parameter(kind):
    """The documented offset layout (<parameter>.diff for non-weights) is one ComfyUI's own LoRA loader
    maps too: it registers a patch for every parameter, with the same result (ComfyUI's ModelPatcher
    then applies those on non-leaf modules only through a baked copy such as the pack's separate
    residency: see _non_leaf_parameters)."""
    model = _setup(kind)[0]
    changes = npo_files.dense_change(model, seed=7)
    patched, _ = comfy.sd.load_lora_for_models(model, None, npo_files.offset_every_parameter_state_dict(changes),
                                               1.0, 0.0)
    assert set(patched.patches) == set(changes)
    sd = model.model.state_dict()
    for key, delta in changes.items():
        torch.testing.assert_close(effective_weight(patched, key), sd[key] + delta, rtol=1e-5, atol=1e-6)
