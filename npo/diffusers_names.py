"""diffusers' parameter names for the models ComfyUI runs: one table row per family.

`diffusers_names(base_model)` gives {diffusers parameter name: Target}, e.g. for Wan
"blocks.0.attn1.to_q.weight" -> diffusion_model.blocks.0.self_attn.q.weight. Files saved by diffusers
or PEFT (LoRAs, offsets, whole transformers) use these names, usually under a "transformer." prefix
(weights/names.py adds the prefixes).

Where ComfyUI has a map of its own (comfy.utils.unet_to_diffusers, mmdit_to_diffusers,
flux_to_diffusers) it is used as it is. Where it has none (Wan, LTX-Video, HunyuanVideo, Lumina 2),
the rows below restate diffusers' own conversion scripts (scripts/convert_wan_to_diffusers.py,
convert_ltx_to_diffusers.py, convert_hunyuan_video*_to_diffusers.py and
loaders/single_file_utils.py:convert_lumina2_to_diffusers), applied to ComfyUI's key names, which
are the original checkpoints' names for these families:
  * `renames`: ordered regex substitutions, as diffusers' scripts apply them; a key no rule changes
    keeps its name (diffusers kept it too);
  * `splits`: fused ComfyUI parameters that diffusers keeps as separate layers (qkv), as row slices.
A model parameter diffusers does not know simply gets no diffusers name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .target import Target

PREFIX = "diffusion_model."


@dataclass(frozen=True)
class Split:
    """A fused parameter `pattern` (regex on the key without "diffusion_model.") whose row blocks
    diffusers names separately: `names` are replacement templates, `sizes(config, rows)` the blocks'
    row counts."""
    pattern: str
    names: tuple[str, ...]
    sizes: Callable[[dict, int], tuple[int, ...]]


def _thirds(_config: dict, rows: int) -> tuple[int, ...]:
    return (rows // 3,) * 3


def _grouped_query_thirds(config: dict, _rows: int) -> tuple[int, ...]:
    """Lumina 2's qkv: n_heads query heads, n_kv_heads key and value heads (grouped-query attention)."""
    head = config["dim"] // config["n_heads"]
    kv = config.get("n_kv_heads") or config["n_heads"]
    return (config["n_heads"] * head, kv * head, kv * head)


def _qkv_split(pattern: str, *templates: str, sizes=_thirds) -> tuple[Split, ...]:
    return tuple(Split(pattern, tuple(t.format(p) for p in ("q", "k", "v")), sizes) for t in templates)


@dataclass(frozen=True)
class Family:
    """How diffusers names one family's parameters."""
    model_class: str                 # comfy.model_base class name (subclasses included)
    comfy_map: Callable | None = None  # ComfyUI's own *_to_diffusers(config, output_prefix)
    renames: tuple[tuple[str, str], ...] = ()
    splits: tuple[Split, ...] = ()


# scripts/convert_wan_to_diffusers.py, TRANSFORMER_KEYS_RENAME_DICT (same order; the norm2/norm3
# swap goes through a placeholder as there)
WAN_RENAMES = (
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"head\.modulation", "scale_shift_table"),
    (r"head\.head", "proj_out"),
    (r"modulation", "scale_shift_table"),
    (r"ffn\.0", "ffn.net.0.proj"),
    (r"ffn\.2", "ffn.net.2"),
    (r"norm2", "norm__placeholder"),
    (r"norm3", "norm2"),
    (r"norm__placeholder", "norm3"),
    (r"img_emb\.proj\.0", "condition_embedder.image_embedder.norm1"),
    (r"img_emb\.proj\.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    (r"img_emb\.proj\.3", "condition_embedder.image_embedder.ff.net.2"),
    (r"img_emb\.proj\.4", "condition_embedder.image_embedder.norm2"),
    (r"img_emb\.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    (r"self_attn\.q", "attn1.to_q"),
    (r"self_attn\.k", "attn1.to_k"),
    (r"self_attn\.v", "attn1.to_v"),
    (r"self_attn\.o", "attn1.to_out.0"),
    (r"self_attn\.norm_q", "attn1.norm_q"),
    (r"self_attn\.norm_k", "attn1.norm_k"),
    (r"cross_attn\.q", "attn2.to_q"),
    (r"cross_attn\.k", "attn2.to_k"),
    (r"cross_attn\.v", "attn2.to_v"),
    (r"cross_attn\.o", "attn2.to_out.0"),
    (r"cross_attn\.norm_q", "attn2.norm_q"),
    (r"cross_attn\.norm_k", "attn2.norm_k"),
    (r"attn2\.to_k_img", "attn2.add_k_proj"),
    (r"attn2\.to_v_img", "attn2.add_v_proj"),
    (r"attn2\.norm_k_img", "attn2.norm_added_k"),
)

# scripts/convert_ltx_to_diffusers.py
LTXV_RENAMES = (
    (r"patchify_proj", "proj_in"),
    (r"adaln_single", "time_embed"),
    (r"q_norm", "norm_q"),
    (r"k_norm", "norm_k"),
)

# single_file_utils.py: convert_lumina2_to_diffusers (context-refiner and final-layer maps first)
LUMINA2_RENAMES = (
    (r"(context_refiner\.\d+)\.attention_norm1", r"\1.norm1"),
    (r"(context_refiner\.\d+)\.attention_norm2", r"\1.norm2"),
    (r"final_layer\.adaLN_modulation\.1", "norm_out.linear_1"),
    (r"final_layer\.linear", "norm_out.linear_2"),
    (r"attention_norm1", "norm1.norm"),
    (r"attention_norm2", "norm2"),
    (r"cap_embedder", "time_caption_embed.caption_embedder"),
    (r"t_embedder\.mlp\.0", "time_caption_embed.timestep_embedder.linear_1"),
    (r"t_embedder\.mlp\.2", "time_caption_embed.timestep_embedder.linear_2"),
    (r"attention", "attn"),
    (r"\.out\.", ".to_out.0."),
    (r"k_norm", "norm_k"),
    (r"q_norm", "norm_q"),
    (r"w1", "linear_1"),
    (r"w2", "linear_2"),
    (r"w3", "linear_3"),
    (r"adaLN_modulation\.1", "norm1.linear"),
)
# diffusers' Lumina2 splits qkv as attn.to_q/k/v; Z-Image-style files say attention.to_q/k/v (ComfyUI
# maps those with equal thirds, which is wrong for Lumina 2's grouped-query attention)
LUMINA2_SPLITS = _qkv_split(r"^(.*)\.attention\.qkv\.(weight|bias)$", r"\1.attn.to_{}.\2", r"\1.attention.to_{}.\2",
                            sizes=_grouped_query_thirds)

# HunyuanVideo (v1 and 1.5): the double/single blocks and the time/vector/guidance embedders are
# Flux's layout (ComfyUI's flux_to_diffusers); the rest restates convert_hunyuan_video_to_diffusers.py
# and convert_hunyuan_video1_5_to_diffusers.py on ComfyUI's names
HUNYUAN_RENAMES = (
    (r"^img_in\.proj", "x_embedder.proj"),
    (r"^txt_in\.input_embedder", "context_embedder.proj_in"),
    (r"^txt_in\.t_embedder\.in_layer", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    (r"^txt_in\.t_embedder\.out_layer", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    (r"^txt_in\.c_embedder\.in_layer", "context_embedder.time_text_embed.text_embedder.linear_1"),
    (r"^txt_in\.c_embedder\.out_layer", "context_embedder.time_text_embed.text_embedder.linear_2"),
    (r"^txt_in\.individual_token_refiner\.blocks\.", "context_embedder.token_refiner.refiner_blocks."),
    (r"(refiner_blocks\.\d+)\.self_attn\.proj", r"\1.attn.to_out.0"),
    (r"(refiner_blocks\.\d+)\.mlp\.0", r"\1.ff.net.0.proj"),
    (r"(refiner_blocks\.\d+)\.mlp\.2", r"\1.ff.net.2"),
    (r"(refiner_blocks\.\d+)\.adaLN_modulation\.1", r"\1.norm_out.linear"),
    # 1.5 only: its timestep embedder, image embedder, condition-type embedding, ByT5 glyph embedder
    (r"^time_in\.in_layer", "time_embed.timestep_embedder.linear_1"),
    (r"^time_in\.out_layer", "time_embed.timestep_embedder.linear_2"),
    (r"^vision_in\.proj\.0", "image_embedder.norm_in"),
    (r"^vision_in\.proj\.1", "image_embedder.linear_1"),
    (r"^vision_in\.proj\.3", "image_embedder.linear_2"),
    (r"^vision_in\.proj\.4", "image_embedder.norm_out"),
    (r"^cond_type_embedding", "cond_type_embed"),
    (r"^byt5_in\.layernorm", "context_embedder_2.norm"),
    (r"^byt5_in\.fc1", "context_embedder_2.linear_1"),
    (r"^byt5_in\.fc2", "context_embedder_2.linear_2"),
    (r"^byt5_in\.fc3", "context_embedder_2.linear_3"),
)
HUNYUAN_SPLITS = _qkv_split(r"^txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn\.qkv\.(weight|bias)$",
                            r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_{}.\2")

# Chroma: Flux's layout plus the modulation approximator, whose MLPs diffusers calls linear_1/2
CHROMA_RENAMES = (
    (r"^(distilled_guidance_layer\.layers\.\d+)\.in_layer", r"\1.linear_1"),
    (r"^(distilled_guidance_layer\.layers\.\d+)\.out_layer", r"\1.linear_2"),
)


def _unet_map(config: dict, output_prefix: str = "") -> dict:
    import comfy.utils

    return {k: output_prefix + v for k, v in comfy.utils.unet_to_diffusers(config).items()}


def _comfy_utils(name: str) -> Callable:
    def build(config: dict, output_prefix: str = "") -> dict:
        import comfy.utils

        return getattr(comfy.utils, name)(config, output_prefix=output_prefix)
    return build


# First row whose model class the model is an instance of wins (subclasses before their bases).
FAMILIES = (
    Family("SD3", comfy_map=_comfy_utils("mmdit_to_diffusers")),
    Family("Chroma", comfy_map=_comfy_utils("flux_to_diffusers"), renames=CHROMA_RENAMES),
    Family("Flux", comfy_map=_comfy_utils("flux_to_diffusers")),
    Family("HunyuanVideo", comfy_map=_comfy_utils("flux_to_diffusers"), renames=HUNYUAN_RENAMES,
           splits=HUNYUAN_SPLITS),
    Family("WAN21", renames=WAN_RENAMES),
    Family("LTXV", renames=LTXV_RENAMES),
    Family("Lumina2", renames=LUMINA2_RENAMES, splits=LUMINA2_SPLITS),
    Family("QwenImage"),  # ComfyUI's Qwen-Image modules carry diffusers' names already
    Family("BaseModel", comfy_map=_unet_map),  # SD1.x/SD2/SDXL UNets (empty for anything else)
)


def family_of(base_model) -> Family:
    import comfy.model_base

    for family in FAMILIES:
        if isinstance(base_model, getattr(comfy.model_base, family.model_class)):
            return family
    return Family("BaseModel")


def _renamed(stem: str, renames) -> str:
    for pattern, replacement in renames:
        stem = re.sub(pattern, replacement, stem)
    return stem


def _split_names(stem: str, shape, split: Split, config: dict) -> dict[str, Target]:
    match = re.match(split.pattern, stem)
    if match is None:
        return {}
    sizes = split.sizes(config, shape[0])
    if sum(sizes) != shape[0]:
        return {}  # not the layout this family row describes: no diffusers names
    out, start = {}, 0
    for template, size in zip(split.names, sizes):
        out[match.expand(template)] = Target(PREFIX + stem, (0, start, size))
        start += size
    return out


def diffusers_names(base_model) -> dict[str, Target]:
    """{diffusers parameter name (no prefix): Target} for this model's family."""
    family = family_of(base_model)
    config = base_model.model_config.unet_config
    shapes = {k[len(PREFIX):]: tuple(v.shape) for k, v in base_model.state_dict().items() if k.startswith(PREFIX)}
    out: dict[str, Target] = {}
    if family.comfy_map is not None:
        for name, target in family.comfy_map(config, output_prefix=PREFIX).items():
            out[name] = Target.of(target)
    for stem, shape in shapes.items():
        parts = {}
        for split in family.splits:
            parts.update(_split_names(stem, shape, split, config))
        out.update(parts)
        if not parts and (family.renames or family.comfy_map is None):
            out.setdefault(_renamed(stem, family.renames), Target(PREFIX + stem))
    return out
