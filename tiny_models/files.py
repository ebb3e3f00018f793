"""Tiny models on disk, in the formats ComfyUI's loaders read, and the registration that lets
ComfyUI's detectors recognise them.

`register_tiny_model_configs()` (idempotent; `unregister_tiny_model_configs()` undoes it):
  * puts the tiny model-config classes ahead of ComfyUI's in `comfy.supported_models.models`, so
    `load_checkpoint_guess_config` / `load_diffusion_model` (CheckpointLoaderSimple, UNETLoader)
    configure tiny files as the tiny classes; each matches tiny widths only;
  * extends ComfyUI's text-encoder loader (`comfy.sd.load_text_encoder_state_dicts`, used by
    `load_clip` and the CLIPLoader / DualCLIPLoader nodes) for tiny text-encoder files, which it
    recognises by their width (text_encoders.is_tiny_text_encoder): it sizes ComfyUI's encoders
    with the tiny configs (`FAMILY_TE_OPTIONS`, in float32 unless the caller sets a dtype) and
    reports a tiny T5/UMT5 as T5-XXL (ComfyUI tells T5-XXL by the width of its 24th block).
    Real files never match, so they load exactly as before.

Text-encoder files by kind and the CLIPType ComfyUI's loader needs (`Family.clip_type`):
  sd3: clip_l + clip_g (DualCLIPLoader, sd3)   wan21/wan22_*: umt5xxl (CLIPLoader, wan)
  chroma: t5xxl (chroma)   ltxv: t5xxl (ltxv)   qwen_image: qwen25_7b (qwen_image)
  lumina2: gemma2_2b (lumina2)   flux_dev: clip_l + t5xxl (DualCLIPLoader, flux)
hunyuan_video15 and hunyuan_video have stand-in encoders that ComfyUI's loader does not build, so
they have no file set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.sd
import comfy.supported_models
import comfy.text_encoders.long_clipl
import comfy.utils

from . import dits, unets
from .build import TinyCheckpoint, build_checkpoint
from .families import family
from .text_encoders import FAMILY_TE_OPTIONS, is_tiny_t5, is_tiny_text_encoder
from .vaes import VAES

# Tiny detection classes, most specific first. The flow variant has no file format of its own
# (its keys equal sd15's), and Wan 2.2 A14B's experts are TinyWan21 files.
_REGISTERED = (
    unets.TinySDXL, unets.TinySD2, unets.TinySD15,
    dits.TinySD3, dits.TinyWan22TI2V5B, dits.TinyWan21, dits.TinyQwenImage, dits.TinyChroma,
    dits.TinyFluxDev, dits.TinyLTXV, dits.TinyHunyuanVideo, dits.TinyHunyuanVideo15, dits.TinyLumina2,
)


def _tiny_detect_te_model(original):
    def detect_te_model(sd):
        if is_tiny_t5(sd):
            return comfy.sd.TEModel.T5_XXL
        return original(sd)

    return detect_te_model


def _tiny_load_text_encoder_state_dicts(original):
    def load_text_encoder_state_dicts(state_dicts=[], embedding_directory=None,
                                      clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}):
        if any(is_tiny_text_encoder(sd) for sd in state_dicts):
            model_options = {**FAMILY_TE_OPTIONS, "dtype": torch.float32, **model_options}
        return original(state_dicts, embedding_directory=embedding_directory, clip_type=clip_type,
                        model_options=model_options)

    return load_text_encoder_state_dicts


def _tiny_model_options_long_clip(original):
    # ComfyUI's long-CLIP check replaces `clip_l_model_config` / `clip_g_model_config` for every
    # CLIP file (with the generic `model_config` option plus the file's position count), which
    # would drop the tiny sizes; tiny CLIPs have the standard 77 positions, so it has nothing to do.
    def model_options_long_clip(sd, tokenizer_data, model_options):
        if is_tiny_text_encoder(sd):
            return tokenizer_data, model_options
        return original(sd, tokenizer_data, model_options)

    return model_options_long_clip


# (module, function name, wrapper factory): ComfyUI's text-encoder loading, extended for tiny files
_LOADER_PATCHES = (
    (comfy.sd, "detect_te_model", _tiny_detect_te_model),
    (comfy.sd, "load_text_encoder_state_dicts", _tiny_load_text_encoder_state_dicts),
    (comfy.text_encoders.long_clipl, "model_options_long_clip", _tiny_model_options_long_clip),
)


def register_tiny_model_configs() -> None:
    """Let ComfyUI's loaders recognise tiny files (idempotent); see the module docstring."""
    models = comfy.supported_models.models
    for cls in reversed(_REGISTERED):
        if cls not in models:
            models.insert(0, cls)
    for module, name, wrap in _LOADER_PATCHES:
        current = getattr(module, name)
        if not hasattr(current, "tiny_original"):
            wrapper = wrap(current)
            wrapper.tiny_original = current
            setattr(module, name, wrapper)


def unregister_tiny_model_configs() -> None:
    models = comfy.supported_models.models
    for cls in _REGISTERED:
        while cls in models:
            models.remove(cls)
    for module, name, _ in _LOADER_PATCHES:
        current = getattr(module, name)
        setattr(module, name, getattr(current, "tiny_original", current))


def save_checkpoint(path: str, kind: str = "sd15", seed: int = 0) -> TinyCheckpoint:
    """Write a single-file `.safetensors` checkpoint (SD1.x/SD2/SDXL kinds) with ComfyUI's own
    saver. It loads back through `comfy.sd.load_checkpoint_guess_config` / CheckpointLoaderSimple
    once the tiny configs are registered (`register_tiny_model_configs`)."""
    if kind not in ("sd15", "sd2", "sdxl"):
        raise ValueError(f"tiny kind {kind!r} has no single-file checkpoint; "
                         "build it with build_checkpoint, or write its model files with save_files")
    ckpt = build_checkpoint(kind, seed)
    comfy.sd.save_checkpoint(path, ckpt.model, ckpt.clip, ckpt.vae)
    return ckpt


@dataclass
class TinyFiles:
    """The files `save_files` wrote, and the checkpoint they hold."""
    diffusion_models: dict    # expert name ("model" when there is one) -> Path, in models/diffusion_models
    text_encoders: list       # Paths in models/text_encoders, in the order ComfyUI's loader takes them
    vae: Path                 # in models/vae
    clip_type: comfy.sd.CLIPType
    built: TinyCheckpoint


def _text_encoder_files(clip: comfy.sd.CLIP) -> dict[str, dict]:
    """Encoder name -> its weights as a standalone file holds them: ComfyUI's CLIP state dict split
    by encoder (as ComfyUI's CLIPSave does), with the tokenizer's sentencepiece model alongside."""
    files = {}
    for key, value in clip.cond_stage_model.state_dict().items():
        encoder, _, rest = key.partition(".")
        if rest.startswith("transformer."):
            files.setdefault(encoder, {})[rest[len("transformer."):]] = value
    for sd in files.values():
        sd.update(clip.tokenizer.state_dict())
    return files


def save_files(models_dir, kind: str, seed: int = 0) -> TinyFiles:
    """Write the tiny kind as separate diffusion-model, text-encoder and VAE files into ComfyUI's
    model folders under `models_dir` (diffusion_models/, text_encoders/, vae/), as the families
    are distributed. They load back through ComfyUI's loaders (`load_files`, or UNETLoader,
    CLIPLoader/DualCLIPLoader with `clip_type`, VAELoader) once `register_tiny_model_configs()` ran."""
    fam = family(kind)
    if fam.clip_type is None or fam.vae is None:
        raise ValueError(f"tiny kind {kind!r} has no file set (stand-in text encoder or no VAE); "
                         "use build_checkpoint")
    root = Path(models_dir)
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    built = build_checkpoint(kind, seed)
    models = built.experts or {"model": built.model}
    diffusion_models = {}
    for name, patcher in models.items():
        suffix = "" if name == "model" else f"_{name}"
        path = diffusion_models[name] = root / "diffusion_models" / f"tiny_{kind}{suffix}.safetensors"
        comfy.utils.save_torch_file(patcher.model.diffusion_model.state_dict(), str(path))
    text_encoders = []
    for encoder, sd in _text_encoder_files(built.clip).items():
        text_encoders.append(root / "text_encoders" / f"tiny_{kind}_{encoder}.safetensors")
        comfy.utils.save_torch_file(sd, str(text_encoders[-1]))
    vae_path = root / "vae" / f"tiny_{kind}_vae.safetensors"
    comfy.utils.save_torch_file(built.vae.get_sd(), str(vae_path), metadata=VAES[fam.vae][1])
    return TinyFiles(diffusion_models, text_encoders, vae_path, comfy.sd.CLIPType[fam.clip_type], built)


def load_files(files: TinyFiles) -> TinyCheckpoint:
    """Load tiny files through ComfyUI's own loaders (the tiny configs must be registered)."""
    experts = {name: comfy.sd.load_diffusion_model(str(path)) for name, path in files.diffusion_models.items()}
    clip = comfy.sd.load_clip([str(p) for p in files.text_encoders], clip_type=files.clip_type)
    vae_sd, metadata = comfy.utils.load_torch_file(str(files.vae), return_metadata=True)
    vae = comfy.sd.VAE(sd=vae_sd, metadata=metadata)
    model = next(iter(experts.values()))
    return TinyCheckpoint(model, clip, vae, experts if len(experts) > 1 else {})
