"""NPO weight files: every format loads with zero unmatched keys and means θ + η·δ; β and η follow
θ_neg = θ_pos + η·δ − β·(θ_pos − θ_base); files for another architecture, or naming a weight twice, or
giving only part of a fused weight, are refused with a reason. (Every DiT family:
test_npo_weights_families.py; damaged files and strength 0: test_npo_weights_refusals.py.)"""
from __future__ import annotations

import pytest
import torch

import comfy.sd

import npo_files
from comfy_selfnpo.npo import weights
from comfy_selfnpo.npo.weights import NPOFormatError, effective_weight, load_npo_file, make_negative_model


def _unet_keys(patcher):
    return [k for k in patcher.model.state_dict() if k.startswith("diffusion_model.")]


def _assert_weights(negative, expected: dict, untouched_from=None):
    """Every UNet weight of `negative` equals `expected[key]` (or `untouched_from`'s weight)."""
    for key in _unet_keys(negative):
        want = expected.get(key)
        if want is None:
            want = effective_weight(untouched_from, key)
        got = effective_weight(negative, key)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind,fmt", [(k, f) for k in ("sd15",) for f in npo_files.WRITERS]
                         + [("sdxl", "kohya_lora"), ("sdxl", "peft_lora"), ("sdxl", "full_model_diffusers")])
def test_every_format_loads_with_zero_unmatched_keys_and_means_theta_plus_eta_delta(tiny, tmp_path, kind, fmt):
    model = tiny.build_model(kind, seed=3)
    offset = npo_files.make_npo_offset(model, seed=1)
    path = npo_files.write(tmp_path / f"npo_{fmt}.safetensors", npo_files.WRITERS[fmt](offset, model))
    npo = load_npo_file(path)
    assert npo.format == fmt.replace("_ldm", "").replace("_diffusers", "")
    eta = 0.7
    negative, report = make_negative_model(model, npo, strength=eta)
    assert report.format == npo.format and report.unmatched == []
    assert report.patched == len(offset.factors)
    assert report.ignored == (["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] if fmt == "kohya_lora" else [])
    assert negative.model is model.model  # a clone carrying patches: the positive is untouched
    sd = model.model.state_dict()
    dense = offset.dense(sd)
    _assert_weights(negative, {k: sd[k] + eta * dense[k] for k in dense}, untouched_from=model)
    _assert_weights(model, {}, untouched_from=tiny.build_model(kind, seed=3))


def test_authors_release_layout_is_read_as_peft(tiny, tmp_path):
    """Diffusion-NPO's released LoRAs are diffusers/PEFT files: unet.<diffusers module>.lora_A/B."""
    model = tiny.build_model("sd15", seed=3)
    sd = npo_files.peft_state_dict(npo_files.make_npo_offset(model, seed=1), model)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in sd
    # the older diffusers attention-processor naming of the same file loads the same way
    old = {k.replace(".to_", ".processor.to_").replace(".to_out.0.", ".to_out.")
            .replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in sd.items()}
    a, ra = make_negative_model(model, weights.npo_weights_from_state_dict(sd))
    b, rb = make_negative_model(model, weights.npo_weights_from_state_dict(old))
    assert ra.unmatched == rb.unmatched == [] and ra.patched == rb.patched > 0
    for key in a.patches:
        torch.testing.assert_close(effective_weight(a, key), effective_weight(b, key))


@pytest.mark.parametrize("beta", [0.0, 0.3, -0.5])
def test_beta_and_eta_follow_the_formula_and_the_negative_inherits_the_positive_loras(tiny, beta):
    base = tiny.build_model("sd15", seed=3)
    user_lora = npo_files.kohya_state_dict(npo_files.make_npo_offset(base, seed=7, scale=0.5), base)
    positive, _ = comfy.sd.load_lora_for_models(base, None, user_lora, 0.8, 0.0)  # a LoRA on the positive
    offset = npo_files.make_npo_offset(base, seed=1)
    npo = weights.npo_weights_from_state_dict(npo_files.peft_state_dict(offset, base))
    eta = 1.3
    if beta == 0.0:
        negative, report = make_negative_model(positive, npo, strength=eta)
    else:
        negative, report = make_negative_model(positive, npo, strength=eta, merge_weight=beta, base=base)
        assert report.merged == len(positive.patches)  # only where θ_pos and θ_base differ
    dense = offset.dense(base.model.state_dict())
    expected = {}
    for key in _unet_keys(base):
        theta_pos = effective_weight(positive, key)
        theta_base = effective_weight(base, key)
        expected[key] = theta_pos + eta * dense.get(key, 0) - beta * (theta_pos - theta_base)
    _assert_weights(negative, expected)
    # the positive's own LoRA really changes weights, and the NPO ones are on top of it
    changed = [k for k in positive.patches if not torch.equal(effective_weight(positive, k), effective_weight(base, k))]
    assert changed and set(changed) & set(dense)


def test_beta_against_an_unrelated_base_model(tiny):
    positive = tiny.build_model("sd15", seed=3)
    base = tiny.build_model("sd15", seed=4)  # its own module: every weight differs
    offset = npo_files.make_npo_offset(positive, seed=1)
    npo = weights.npo_weights_from_state_dict(npo_files.offset_state_dict(offset, positive))
    negative, report = make_negative_model(positive, npo, strength=0.5, merge_weight=0.25, base=base)
    assert report.merged == len(_unet_keys(positive))
    dense = offset.dense(positive.model.state_dict())
    pos_sd, base_sd = positive.model.state_dict(), base.model.state_dict()
    _assert_weights(negative, {k: pos_sd[k] + 0.5 * dense.get(k, 0) - 0.25 * (pos_sd[k] - base_sd[k])
                               for k in _unet_keys(positive)})


def test_full_unet_is_an_offset_against_the_base_model(tiny):
    """A full Self-NPO UNet trained from `base` applied to a fine-tune: θ_neg = θ_pos + (θ_npo − θ_base)."""
    base = tiny.build_model("sd15", seed=3)
    finetune = tiny.build_model("sd15", seed=4)
    offset = npo_files.make_npo_offset(base, seed=1)
    npo = weights.npo_weights_from_state_dict(npo_files.full_unet_state_dict(offset, base, "ldm"))
    negative, report = make_negative_model(finetune, npo, merge_weight=0.0, base=base)
    dense = offset.dense(base.model.state_dict())
    assert report.patched == len(dense)
    ft = finetune.model.state_dict()
    _assert_weights(negative, {k: ft[k] + dense[k] for k in dense}, untouched_from=finetune)


def test_a_file_for_another_architecture_is_refused_with_the_reason(tiny, tmp_path):
    sd15 = tiny.build_model("sd15", seed=3)
    sdxl = tiny.build_model("sdxl", seed=3)
    for fmt in ("kohya_lora", "peft_lora", "full_model_ldm"):
        path = npo_files.write(tmp_path / f"xl_{fmt}.safetensors",
                               npo_files.WRITERS[fmt](npo_files.make_npo_offset(sdxl, seed=1), sdxl))
        with pytest.raises(NPOFormatError, match="another architecture|not a whole model"):
            make_negative_model(sd15, load_npo_file(path))
    # names that fit no layer at all
    bogus = {f"lora_unet_nonexistent_block_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(3)}
    bogus.update({f"lora_unet_nonexistent_block_{i}.lora_up.weight": torch.zeros(8, 4) for i in range(3)})
    with pytest.raises(NPOFormatError, match=r"only 0 of 6 diffusion-model entries match"):
        make_negative_model(sd15, weights.npo_weights_from_state_dict(bogus, "bogus.safetensors"))


def test_unreadable_and_unknown_files_and_missing_base_give_clear_errors(tiny, tmp_path):
    model = tiny.build_model("sd15", seed=3)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_npo_file(str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(NPOFormatError, match="could not read"):
        load_npo_file(str(junk))
    path = npo_files.write(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": torch.zeros(2, 2)})
    with pytest.raises(NPOFormatError, match="unrecognised NPO weight file"):
        load_npo_file(path)
    loha = npo_files.write(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(NPOFormatError, match=r"LyCORIS layer 'lora_unet_x' has no hada_w1_a\+hada_w1_b"):
        load_npo_file(loha)
    npo = weights.npo_weights_from_state_dict(npo_files.kohya_state_dict(npo_files.make_npo_offset(model), model))
    with pytest.raises(ValueError, match="needs the base model"):
        make_negative_model(model, npo, merge_weight=0.5)


def test_files_that_name_a_weight_twice_or_give_part_of_a_fused_weight_are_refused(tiny):
    model = tiny.build_model("sd3", seed=3)
    offset = npo_files.lowrank_offset(model, ["diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], seed=1)
    lora, _ = npo_files.diffusers_peft_state_dict(offset, model, "sd3")
    bare, _ = npo_files.diffusers_peft_state_dict(offset, model, "sd3", prefix="")
    with pytest.raises(NPOFormatError, match=r"twice\.safetensors: 'transformer\.transformer_blocks\.0\.attn\.to_q' and "
                                             r"'transformer_blocks\.0\.attn\.to_q' both change diffusion_model\.joint_blocks"
                                             r"\.0\.x_block\.attn\.qkv\.weight\[0:128\]; a file may change each weight once"):
        make_negative_model(model, weights.npo_weights_from_state_dict({**lora, **bare}, "twice.safetensors"))
    whole, _ = npo_files.diffusers_full_model_state_dict(model, npo_files.dense_change(model), "sd3")
    del whole["transformer_blocks.1.attn.to_k.weight"]
    with pytest.raises(NPOFormatError, match=r"give 256 of the 384 rows of diffusion_model\.joint_blocks\.1\.x_block"
                                             r"\.attn\.qkv\.weight .* the file is incomplete"):
        make_negative_model(model, weights.npo_weights_from_state_dict(whole, "part.safetensors"))
