"""The tiny DiT and video families (tiny_models): built from ComfyUI's classes, bit-reproducible,
sampled by ComfyUI's KSampler with real CFG on their own text encoder's conditioning, decoded and
encoded by their own VAE, and written to files that ComfyUI's own loaders read back bit-exactly."""
from __future__ import annotations

import pytest
import torch

import comfy.sd
import folder_paths
import nodes

from comfy_selfnpo import tiny_models

DIT_KINDS = tiny_models.DIT_KINDS
FILE_KINDS = [kind for kind in DIT_KINDS if tiny_models.family(kind).clip_type is not None]
PROMPT = "a red cube on a wooden table"
_BUILT = {}


@pytest.fixture(scope="module", autouse=True)
def _release_builds():
    yield
    _BUILT.clear()


def _built(kind):
    """One build per kind for this module (sampling and decoding leave it unchanged)."""
    if kind not in _BUILT:
        _BUILT[kind] = tiny_models.build_checkpoint(kind, seed=3)
    return _BUILT[kind]


def _conditioning(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _ksample(model, clip, latent_shape, cfg=4.0, seed=11, steps=3, **kwargs):
    latent = {"samples": torch.zeros(latent_shape)}
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", _conditioning(clip, PROMPT),
                                   _conditioning(clip, ""), latent, **kwargs)
    return out["samples"]


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_family_builds_bit_reproducibly_from_its_seed(kind):
    built = _built(kind)
    again = tiny_models.build_checkpoint(kind, seed=3)
    other = tiny_models.build_model(kind, seed=4)
    weights = built.model.model.state_dict()
    assert _state_equal(weights, again.model.model.state_dict())
    assert not _state_equal(weights, other.model.state_dict())
    assert _state_equal(built.clip.cond_stage_model.state_dict(), again.clip.cond_stage_model.state_dict())
    if built.vae is not None:
        assert _state_equal(built.vae.get_sd(), again.vae.get_sd())
    # every parameter and filled buffer was drawn: nothing left at torch.empty's arbitrary values
    for name, tensor in built.model.model.diffusion_model.state_dict().items():
        assert torch.isfinite(tensor).all() and tensor.abs().max() < 10, name


@pytest.mark.parametrize("kind", DIT_KINDS)
def test_family_samples_through_ksampler_with_real_cfg_on_its_own_conditioning(kind):
    fam, built = tiny_models.family(kind), _built(kind)
    cond = _conditioning(built.clip, PROMPT)
    for key in fam.cond_keys:
        assert key in cond[0][1], key  # e.g. Chroma's pooled_output (None), LTXV's attention_mask

    samples = _ksample(built.model, built.clip, fam.sample_latent)
    assert samples.shape == fam.sample_latent
    assert len(fam.sample_latent) == fam.latent_dimensions + 2 and fam.sample_latent[1] == fam.latent_channels
    assert torch.isfinite(samples).all() and samples.std() > 0.1
    assert torch.equal(samples, _ksample(built.model, built.clip, fam.sample_latent))
    # the negative prompt's branch counts: CFG 4 differs from CFG 1, which never evaluates it
    assert (samples - _ksample(built.model, built.clip, fam.sample_latent, cfg=1.0)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", [kind for kind in DIT_KINDS if tiny_models.family(kind).vae])
def test_family_vae_decodes_frames_and_encodes_back_with_the_family_compression(kind):
    fam, vae = tiny_models.family(kind), _built(kind).vae
    latent = torch.randn(fam.sample_latent, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = vae.decode(latent)
        height, width = (fam.spatial_compression * n for n in fam.sample_latent[-2:])
        if fam.latent_dimensions == 3:
            assert images.shape == (1, fam.pixel_frames(fam.sample_latent[2]), height, width, 3)
            images = images[0]  # IMAGE batch = frames, as VAEEncode takes a clip
        else:
            assert images.shape == (1, height, width, 3)
        encoded = vae.encode(images)
    assert torch.isfinite(images).all() and images.std() > 1e-3
    assert encoded.shape == fam.sample_latent and torch.isfinite(encoded).all()
    assert vae.latent_channels == fam.latent_channels
    assert vae.spacial_compression_decode() == fam.spatial_compression
    assert vae.temporal_compression_decode() == fam.temporal_compression


@pytest.mark.parametrize("kind", [kind for kind in DIT_KINDS if kind not in FILE_KINDS])
def test_diffusion_model_weights_alone_load_as_the_same_tiny_model(tiny, kind):
    """The kinds without a file set: ComfyUI's diffusion-model loader configures their weights alike."""
    built = _built(kind).model.model
    loaded = comfy.sd.load_diffusion_model_state_dict(built.diffusion_model.state_dict()).model
    assert type(loaded.model_config) is tiny.family(kind).config
    assert loaded.model_config.unet_config == built.model_config.unet_config
    assert _state_equal(loaded.state_dict(), built.state_dict())


def test_frame_rules_follow_the_temporal_compression():
    wan, ltxv, sd3 = (tiny_models.family(kind) for kind in ("wan21", "ltxv", "sd3"))
    assert [wan.pixel_frames(t) for t in (1, 2, 21)] == [1, 5, 81]
    assert wan.latent_frames(81) == 21 and ltxv.latent_frames(121) == 16 and sd3.latent_frames(1) == 1
    with pytest.raises(ValueError, match="80 frames.*4\\*k\\+1"):
        wan.latent_frames(80)


def test_wan22_a14b_has_two_experts_that_sample_in_turn():
    built = _built("wan22_a14b")
    high, low = built.experts["high_noise"], built.experts["low_noise"]
    assert list(built.experts) == ["high_noise", "low_noise"] and built.model is high
    assert not torch.equal(high.model.diffusion_model.head.head.weight, low.model.diffusion_model.head.head.weight)
    shape, steps, switch = tiny_models.family("wan22_a14b").sample_latent, 4, 2
    first = _ksample(high, built.clip, shape, steps=steps, last_step=switch, force_full_denoise=False)
    latent = {"samples": first}
    (out,) = nodes.common_ksampler(low, 11, steps, 4.0, "euler", "simple", _conditioning(built.clip, PROMPT),
                                   _conditioning(built.clip, ""), latent, start_step=switch, disable_noise=True)
    both = out["samples"]
    assert both.shape == shape and torch.isfinite(both).all()
    assert (both - _ksample(high, built.clip, shape, steps=steps)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_family_files_round_trip_bit_exactly_through_comfyui_loaders(tiny, tmp_path, kind):
    files = tiny.save_files(tmp_path, kind, seed=5)
    loaded = tiny.load_files(files)
    built = files.built
    for name, reference in (built.experts or {"model": built.model}).items():
        model = (loaded.experts or {"model": loaded.model})[name]
        assert type(model.model.model_config) is tiny.family(kind).config
        assert model.model.model_config.unet_config == reference.model.model_config.unet_config
        assert _state_equal(model.model.state_dict(), reference.model.state_dict())
    ref_cond, cond = _conditioning(built.clip, PROMPT), _conditioning(loaded.clip, PROMPT)
    assert torch.equal(cond[0][0], ref_cond[0][0])
    assert cond[0][1].keys() == ref_cond[0][1].keys()
    latent = torch.randn(tiny.family(kind).sample_latent, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.vae.decode(latent), built.vae.decode(latent))


@pytest.mark.parametrize("kind,clip_loader", [("sd3", "DualCLIPLoader"), ("wan21", "CLIPLoader")])
def test_family_files_load_through_comfyui_loader_nodes(tiny, comfy_registry, tmp_path, kind, clip_loader):
    files = tiny.save_files(tmp_path, kind, seed=6)
    for folder in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.folder_names_and_paths[folder] = ([str(tmp_path / folder)], folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.clear()
    registry = comfy_registry.NODE_CLASS_MAPPINGS
    (model,) = registry["UNETLoader"]().load_unet(files.diffusion_models["model"].name, "default")
    if clip_loader == "CLIPLoader":
        names = {"clip_name": files.text_encoders[0].name}
    else:
        names = {f"clip_name{i + 1}": path.name for i, path in enumerate(files.text_encoders)}
    (clip,) = registry[clip_loader]().load_clip(type=files.clip_type.name.lower(), **names)
    (vae,) = registry["VAELoader"]().load_vae(files.vae.name)

    built, shape = files.built, tiny.family(kind).sample_latent
    assert torch.equal(_ksample(model, clip, shape), _ksample(built.model, built.clip, shape))
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(vae.decode(latent), built.vae.decode(latent))


def test_registration_only_claims_tiny_files_and_can_be_undone(tiny):
    import comfy.supported_models

    assert tiny.text_encoders.is_tiny_text_encoder(_built("wan21").clip.cond_stage_model.umt5xxl.transformer.state_dict())
    assert not tiny.text_encoders.is_tiny_text_encoder(tiny.build_clip("sd15").cond_stage_model.clip_l.transformer.state_dict())
    assert hasattr(comfy.sd.load_text_encoder_state_dicts, "tiny_original")
    tiny.register_tiny_model_configs()  # idempotent
    assert comfy.supported_models.models.count(tiny.family("sd3").config) == 1
    tiny.unregister_tiny_model_configs()
    assert not hasattr(comfy.sd.load_text_encoder_state_dicts, "tiny_original")
    assert not hasattr(comfy.sd.detect_te_model, "tiny_original")
    assert tiny.family("sd3").config not in comfy.supported_models.models
    tiny.register_tiny_model_configs()


def test_families_without_a_file_set_say_so():
    with pytest.raises(ValueError, match="hunyuan_video15.*no file set"):
        tiny_models.save_files("/nonexistent", "hunyuan_video15")
    with pytest.raises(ValueError, match="unknown tiny model kind 'sd4'"):
        tiny_models.build_model("sd4")
