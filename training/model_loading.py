"""Load what the headless trainer trains through ComfyUI's own loaders (no server): a single-file
checkpoint (`comfy.sd.load_state_dict_guess_config`, what CheckpointLoaderSimple uses), or a
diffusion model + text encoder(s) + VAE as separate files (what UNETLoader / CLIPLoader /
DualCLIPLoader / VAELoader use). Every failure becomes a `ModelLoadError` or `UnsupportedModel`
that names the file and says what to do.

Call `comfyui_env.ensure_comfyui()` before importing this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import TrainingError, UnsupportedModel


class ModelLoadError(TrainingError):
    """A model file is missing, unreadable or incomplete."""


@dataclass
class LoadedModels:
    model: object   # ModelPatcher
    clip: object    # comfy.sd.CLIP
    vae: object     # comfy.sd.VAE or None
    description: str
    demo: object = None  # --demo: the digits model's judge and prompts (digits/demo.py DigitsDemo)


def _read_state_dict(path, what: str):
    import comfy.utils

    path = Path(path).expanduser()
    if path.is_dir():
        raise ModelLoadError(f"the {what} {str(path)!r} is a folder; give the model file itself "
                             "(.safetensors, .ckpt, .pt)")
    if not path.is_file():
        raise ModelLoadError(f"{what} file not found: {str(path)!r}")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"cannot read the {what} {str(path)!r}: permission denied")
    try:
        return comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    except Exception as e:  # safetensors/pickle raise many kinds for damaged files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(f"cannot read the {what} {str(path)!r}: it is damaged or not a model file "
                             f"(.safetensors, .ckpt, .pt) ({type(e).__name__}: {first})") from e


def _embedding_dirs():
    try:
        import folder_paths

        return folder_paths.get_folder_paths("embeddings")
    except Exception:
        return None


def _unsupported(path, what):
    return UnsupportedModel(
        f"ComfyUI does not recognise the {what} {str(path)!r} as a diffusion model it can load "
        "(unsupported architecture, or not a diffusion checkpoint). Self-NPO training supports the "
        "UNet/DiT models ComfyUI loads, e.g. SD1.5, SD2 and SDXL checkpoints.")


# ComfyUI fills in these itself when a file lacks them
_OPTIONAL_TEXT_ENCODER_KEYS = (".logit_scale", ".text_projection.weight", "position_ids")


def _check_text_encoder_weights(clip, state_dicts, paths) -> None:
    """ComfyUI builds a text encoder even from a file that holds none of its weights (a VAE given as
    --text-encoder), leaving it uninitialised: NaN or random embeddings. Refuse that instead."""
    missing_everywhere = None
    for sd in state_dicts:
        missing, _unexpected = clip.load_sd(dict(sd))
        missing = {k for k in missing if not k.endswith(_OPTIONAL_TEXT_ENCODER_KEYS)}
        missing_everywhere = missing if missing_everywhere is None else missing_everywhere & missing
    total = len(clip.cond_stage_model.state_dict())
    if missing_everywhere and len(missing_everywhere) > 0.1 * total:
        names = ", ".join(Path(p).name for p in paths)
        raise ModelLoadError(
            f"the text encoder file(s) {names} hold {total - len(missing_everywhere)} of the {total} weights of "
            f"the text encoder ComfyUI built for them ({len(missing_everywhere)} missing, e.g. "
            f"{sorted(missing_everywhere)[0]}): is it a text encoder (not a VAE or diffusion model), and the "
            "right --clip-type?")


def load_checkpoint(path) -> LoadedModels:
    """A single-file checkpoint with MODEL, CLIP and VAE."""
    import comfy.sd

    sd, metadata = _read_state_dict(path, "checkpoint")
    if not sd:
        raise ModelLoadError(f"the checkpoint {str(path)!r} holds no tensors")
    try:
        out = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True,
                                                    embedding_directory=_embedding_dirs(), metadata=metadata)
    except Exception as e:
        raise ModelLoadError(f"ComfyUI could not build a model from {str(path)!r}: {e}") from e
    if out is None:
        raise _unsupported(path, "checkpoint")
    model, clip, vae = out[0], out[1], out[2]
    if clip is None:
        raise ModelLoadError(f"{str(path)!r} holds a diffusion model but no text encoder; pass it as "
                             "--diffusion-model together with --text-encoder (and --vae for image data)")
    if getattr(vae, "first_stage_model", None) is None:
        vae = None
    return LoadedModels(model, clip, vae, f"checkpoint {Path(path).name}")


def load_parts(diffusion_model=None, text_encoders=(), vae=None, clip_type: str = "stable_diffusion",
               checkpoint=None) -> LoadedModels:
    """A checkpoint and/or separate files; a separate file replaces the checkpoint's part."""
    import comfy.sd

    base = load_checkpoint(checkpoint) if checkpoint else None
    model = base.model if base else None
    clip = base.clip if base else None
    vae_obj = base.vae if base else None
    parts = [base.description] if base else []
    if diffusion_model:
        sd, metadata = _read_state_dict(diffusion_model, "diffusion model")
        try:
            model = comfy.sd.load_diffusion_model_state_dict(sd, metadata=metadata)
        except Exception as e:
            raise ModelLoadError(f"ComfyUI could not build a diffusion model from {str(diffusion_model)!r}: {e}") from e
        if model is None:
            raise _unsupported(diffusion_model, "diffusion model")
        parts.append(f"diffusion model {Path(diffusion_model).name}")
    if text_encoders:
        try:
            kind = comfy.sd.CLIPType[clip_type.upper()]
        except KeyError:
            raise ModelLoadError(f"unknown --clip-type {clip_type!r}; choose from "
                                 f"{', '.join(t.name.lower() for t in comfy.sd.CLIPType)}") from None
        # ComfyUI converts older layouts in place, inside this list: check the weights it then loaded
        state_dicts = [_read_state_dict(p, "text encoder")[0] for p in text_encoders]
        try:
            clip = comfy.sd.load_text_encoder_state_dicts(state_dicts, embedding_directory=_embedding_dirs(),
                                                          clip_type=kind)
        except Exception as e:
            raise ModelLoadError(f"ComfyUI could not build a text encoder from {list(map(str, text_encoders))}: {e}") from e
        _check_text_encoder_weights(clip, state_dicts, text_encoders)
        parts.append("text encoder " + " + ".join(Path(p).name for p in text_encoders))
    if vae:
        sd, metadata = _read_state_dict(vae, "VAE")
        try:
            vae_obj = comfy.sd.VAE(sd=sd, metadata=metadata)
            vae_obj.throw_exception_if_invalid()
        except Exception as e:
            raise ModelLoadError(f"{str(vae)!r} is not a VAE ComfyUI can load: {str(e).strip().splitlines()[0]}") from e
        parts.append(f"VAE {Path(vae).name}")
    if model is None:
        raise ModelLoadError("no model given: pass --checkpoint FILE, or --diffusion-model FILE with "
                             "--text-encoder FILE (and --vae FILE for image data)")
    if clip is None:
        raise ModelLoadError("no text encoder: pass --text-encoder FILE (twice for SDXL's CLIP-L and "
                             "CLIP-G, with --clip-type sdxl) or a --checkpoint that contains one")
    return LoadedModels(model, clip, vae_obj, ", ".join(parts))


def with_shift(model, shift: float):
    """A clone of a flow MODEL sampling (and so training) with another timestep shift, as ComfyUI's
    ModelSamplingSD3 / ModelSamplingFlux / ModelSamplingAuraFlow nodes set it: the same schedule class,
    new parameters. EPS/V models have no shift: UnsupportedModel."""
    import inspect

    import comfy.model_sampling

    current = model.get_model_object("model_sampling")
    if not isinstance(current, comfy.model_sampling.CONST):
        raise UnsupportedModel(f"--shift applies to flow models (SD3, Flux, Chroma, Wan, Qwen-Image, ...); this "
                               f"model samples with {type(current).__name__}")
    if shift <= 0:
        raise ModelLoadError(f"--shift must be > 0, got {shift}")
    sampling = type(current)(model.model.model_config)
    parameters = inspect.signature(sampling.set_parameters).parameters
    kwargs = {"shift": shift}
    if "multiplier" in parameters:
        kwargs["multiplier"] = current.multiplier
    sampling.set_parameters(**kwargs)
    clone = model.clone()
    clone.add_object_patch("model_sampling", sampling)
    return clone
