"""What training needs to know per model family, one table row each: which layers a LoRA preset
trains, whether the family makes video, its default precision. A model is matched by its layers
(the first row whose attention pattern names some Linear layer of the model), so variants with the
same blocks (Wan 2.1 and 2.2, Flux and Chroma, SD1.x/SD2/SDXL) share a row and a new family is a
new row here, nothing else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# what every UNet (SD1.x, SD2, SDXL) and LTXV name their attention and feed-forward layers
_DIFFUSERS_ATTN = r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_DIFFUSERS_FF = r"(^|\.)ff\.net\.(0\.proj|2)$"


@dataclass(frozen=True)
class Family:
    name: str
    attn: str                # regex over module names: the "attn" LoRA preset
    ff: str                  # regex: the feed-forward layers "attn+ff" adds
    video: bool | None = None  # trains clips (frames); None: when its latent format is 3-D (time axis)
    precision: str = "fp16"    # what mixed_precision "auto" means for it

    def lora_targets(self, targets: str) -> str:
        """A preset name ("attn", "attn+ff") as this family's regex; anything else is returned as is."""
        if targets == "attn":
            return self.attn
        if targets == "attn+ff":
            return f"{self.attn}|{self.ff}"
        return targets


FAMILIES: tuple[Family, ...] = (
    # LTXV names its layers like the UNets, but at the top level (the UNets' sit in input_blocks...)
    Family("LTXV", r"^transformer_blocks\.\d+\." + _DIFFUSERS_ATTN.removeprefix(r"(^|\.)"),
           r"^transformer_blocks\.\d+\." + _DIFFUSERS_FF.removeprefix(r"(^|\.)"), precision="bf16"),
    Family("UNet (SD1.x / SD2 / SDXL)", _DIFFUSERS_ATTN, _DIFFUSERS_FF),
    Family("MMDiT (SD3 / SD3.5)", r"joint_blocks\.\d+\.(context_block|x_block)\.attn\.(qkv|proj)$",
           r"joint_blocks\.\d+\.(context_block|x_block)\.mlp\.(fc1|fc2)$", precision="bf16"),
    Family("Wan 2.x", r"(^|\.)blocks\.\d+\.(self_attn|cross_attn)\.(q|k|v|o)$", r"(^|\.)blocks\.\d+\.ffn\.(0|2)$",
           precision="bf16"),
    Family("Qwen-Image", r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
           r"add_v_proj|to_add_out)$", r"^transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)$",
           video=False, precision="bf16"),  # an image model on the Wan VAE's 3-D latents
    # Flux, Chroma, HunyuanVideo: double-block attention and single-block linears
    Family("Flux / Chroma / HunyuanVideo", r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$|"
           r"(^|\.)single_blocks\.\d+\.(linear1|linear2)$", r"double_blocks\.\d+\.(img|txt)_mlp\.(0|2)$",
           precision="bf16"),
    Family("Lumina 2", r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)$",
           r"(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.(w1|w2|w3)$", precision="bf16"),
)
GENERIC = Family("other", _DIFFUSERS_ATTN, _DIFFUSERS_FF)


def family_of(base_model) -> Family:
    """The table row of a ComfyUI BaseModel, matched by the names of its Linear layers."""
    names = [n for n, m in base_model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)]
    for family in FAMILIES:
        pattern = re.compile(family.attn)
        if any(pattern.search(n) for n in names):
            return family
    return GENERIC


def makes_video(family: Family, base_model) -> bool:
    if family.video is not None:
        return family.video
    return int(getattr(base_model.latent_format, "latent_dimensions", 2)) == 3
