"""The one registry of what the pack knows per model family, one row each: the ComfyUI model config
classes it covers, which layers a LoRA preset trains, whether it makes video, the method's recipe
(recipes.py: w, unconditional input, resolution, frames, crop, learning rate, precision), the export
metadata other tools read (kohya's `ss_base_model_version`, `modelspec.architecture`) and which row of
the diffusers-name table (npo/diffusers_names.py) names its parameters.

A model is matched by its config class along the class hierarchy (subclasses, the test suite's tiny
models included, take their family's row); a model no row names falls back to the first row whose
attention pattern names some Linear layer of it, then to GENERIC. A new family is a new row here,
plus its table in npo/diffusers_names.py if diffusers names its parameters differently (npo is the
inference side and never imports training, so that table stays there and the row names it).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from . import recipes
from .recipes import Recipe

# what every UNet (SD1.x, SD2, SDXL) and LTXV name their attention and feed-forward layers
_DIFFUSERS_ATTN = r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_DIFFUSERS_FF = r"(^|\.)ff\.net\.(0\.proj|2)$"
_MMDIT = r"joint_blocks\.\d+\.(context_block|x_block)\."
_WAN_ATTN, _WAN_FF = r"(^|\.)blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)$", r"(^|\.)blocks\.\d+\.ffn\.(0|2)$"
# Flux, Chroma, HunyuanVideo: double-block attention and single-block linears
_DOUBLE_ATTN = r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$|(^|\.)single_blocks\.\d+\.(linear1|linear2)$"
_DOUBLE_FF = r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)$"


@dataclass(frozen=True)
class Family:
    name: str
    configs: tuple[str, ...]          # ComfyUI model config class names (comfy.supported_models) it covers
    attn: str                         # regex over module names: the "attn" LoRA preset
    ff: str                           # regex: the feed-forward layers "attn+ff" adds
    recipe: Recipe = recipes.GENERIC
    architecture: tuple[str, str] | None = None  # (ss_base_model_version, modelspec.architecture stem)
    diffusers: str = "BaseModel"      # its row of npo/diffusers_names.py (named by its model class)
    video: bool | None = None         # trains clips (frames); None: when its latent format is 3-D (time axis)

    @property
    def precision(self) -> str:
        """What mixed_precision "auto" means for it."""
        return self.recipe.precision

    def lora_targets(self, targets: str) -> str:
        """A preset name ("attn", "attn+ff") as this family's regex; anything else is returned as is."""
        if targets == "attn":
            return self.attn
        if targets == "attn+ff":
            return f"{self.attn}|{self.ff}"
        return targets

    def diffusers_family(self):
        """Its row of the diffusers-name table (npo/diffusers_names.py)."""
        from ..npo.diffusers_names import FAMILIES as DIFFUSERS

        return next(row for row in DIFFUSERS if row.model_class == self.diffusers)


FAMILIES: tuple[Family, ...] = (
    Family("SD1.x", ("SD15",), _DIFFUSERS_ATTN, _DIFFUSERS_FF, recipes.SD15, ("sd_v1", "stable-diffusion-v1"),
           video=False),
    Family("SD2.x", ("SD20",), _DIFFUSERS_ATTN, _DIFFUSERS_FF, recipes.SD2, ("sd_v2", "stable-diffusion-v2"),
           video=False),
    Family("SDXL", ("SDXL",), _DIFFUSERS_ATTN, _DIFFUSERS_FF, recipes.SDXL,
           ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"), video=False),
    Family("MMDiT (SD3 / SD3.5)", ("SD3",), _MMDIT + r"attn\.(qkv|proj)$", _MMDIT + r"mlp\.(fc1|fc2)$",
           recipes.SD3, ("sd3", "stable-diffusion-3"), "SD3", video=False),
    Family("Wan 2.2 TI2V-5B", ("WAN22_T2V",), _WAN_ATTN, _WAN_FF, recipes.WAN22_5B, ("wan", "wan-2.2-ti2v-5b"),
           "WAN21", video=True),
    # Wan 2.2 A14B's experts have Wan 2.1's architecture and load as it
    Family("Wan 2.1 / Wan 2.2 A14B", ("WAN21_T2V",), _WAN_ATTN, _WAN_FF, recipes.WAN21, ("wan", "wan-2.1-t2v"),
           "WAN21", video=True),
    Family("Qwen-Image", ("QwenImage",), r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|"
           r"add_k_proj|add_v_proj|to_add_out)$", r"^transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)$",
           recipes.QWEN_IMAGE, ("qwen_image", "qwen-image"), "QwenImage", video=False),  # on the Wan VAE's 3-D latents
    Family("Chroma", ("Chroma",), _DOUBLE_ATTN, _DOUBLE_FF, recipes.CHROMA, ("chroma", "chroma"), "Chroma",
           video=False),
    Family("HunyuanVideo 1.5", ("HunyuanVideo15",), _DOUBLE_ATTN, _DOUBLE_FF, recipes.HUNYUAN_VIDEO15,
           ("hunyuan_video", "hunyuan-video-1.5"), "HunyuanVideo", video=True),
    # guidance-distilled: the trainer refuses them; the rows name their layers and export metadata
    Family("Flux", ("Flux",), _DOUBLE_ATTN, _DOUBLE_FF, recipes.GUIDANCE_DISTILLED, ("flux1", "flux-1-dev"), "Flux",
           video=False),
    Family("HunyuanVideo", ("HunyuanVideo",), _DOUBLE_ATTN, _DOUBLE_FF, recipes.GUIDANCE_DISTILLED,
           ("hunyuan_video", "hunyuan-video"), "HunyuanVideo", video=True),
    # LTXV names its layers like the UNets, but at the top level (the UNets' sit in input_blocks...)
    Family("LTXV", ("LTXV",), r"^transformer_blocks\.\d+\." + _DIFFUSERS_ATTN.removeprefix(r"(^|\.)"),
           r"^transformer_blocks\.\d+\." + _DIFFUSERS_FF.removeprefix(r"(^|\.)"), recipes.LTXV, ("ltxv", "ltx-video"),
           "LTXV", video=True),
    Family("Lumina 2", ("Lumina2",), r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)$",
           r"(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.(w1|w2|w3)$", recipes.LUMINA2,
           ("lumina2", "lumina-image-2"), "Lumina2", video=False),
)
GENERIC = Family("other", (), _DIFFUSERS_ATTN, _DIFFUSERS_FF)


def _linear_names(base_model) -> list[str]:
    network = getattr(base_model, "diffusion_model", None)
    return [n for n, m in network.named_modules() if isinstance(m, torch.nn.Linear)] if network is not None else []


def family_of(base_model) -> Family:
    """The registry row of a ComfyUI BaseModel: by its config class, else by its layer names."""
    for cls in type(base_model.model_config).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.configs:
                return family
    names = _linear_names(base_model)
    for family in FAMILIES:
        pattern = re.compile(family.attn)
        if any(pattern.search(n) for n in names):  # its layers and recipe, not its name or metadata
            return dataclasses.replace(family, name=f"{family.name} layout", configs=(), architecture=None,
                                       video=None)
    return GENERIC


def makes_video(family: Family, base_model) -> bool:
    if family.video is not None:
        return family.video
    return int(getattr(base_model.latent_format, "latent_dimensions", 2)) == 3
