"""How the entries of NPO weight files are named: LoRA matrices, offsets, parts to skip.

One row per layout; a new layout is one more row."""
from __future__ import annotations

# (down suffix, up suffix) of every LoRA layout ComfyUI's LoRA loader (comfy.weight_adapter.lora)
# understands
LORA_LAYOUTS = (
    (".lora_down.weight", ".lora_up.weight"),                      # kohya
    (".lora_A.weight", ".lora_B.weight"),                          # PEFT / diffusers
    (".lora_A.default.weight", ".lora_B.default.weight"),          # PEFT, named adapter "default"
    (".lora.down.weight", ".lora.up.weight"),                      # diffusers attention processors
    ("_lora.down.weight", "_lora.up.weight"),                      # older diffusers processors
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
KOHYA_SUFFIXES = LORA_LAYOUTS[0]
# entries that travel with a LoRA layer
LORA_EXTRAS = {".lora_mid.weight": "mid", ".alpha": "alpha", ".dora_scale": "dora_scale"}
# offsets: ComfyUI's LoraSave "full_diff" layout. ".diff" is the change of "<stem>.weight" — or of
# the parameter "<stem>" itself when it is not a layer's weight (Wan's blocks.0.modulation) —
# ".diff_b" the change of "<stem>.bias". PEFT's lora_bias (".lora_B.bias") is a bias change too:
# diffusers' Wan LoRA conversion writes the original files' .diff_b there.
OFFSET_SUFFIXES = {".diff": "weight", ".diff_b": "bias", ".lora_B.bias": "bias"}

TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "text_encoders.", "cond_stage_model.",
                         "conditioner.", "clip_l.", "clip_g.", "lora_te1_", "lora_te2_")
VAE_PREFIXES = ("first_stage_model.", "vae.", "encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LYCORIS_MARKERS = (".hada_", ".lokr_")


def lora_role(key: str) -> tuple[str, str] | None:
    """(stem, role) of a LoRA entry, role one of down/up/mid/alpha/dora_scale; None otherwise."""
    for down, up in LORA_LAYOUTS:
        for suffix, role in ((down, "down"), (up, "up")):
            if key.endswith(suffix):
                return key[: -len(suffix)], role
    for suffix, role in LORA_EXTRAS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def offset_param(key: str) -> tuple[str, str] | None:
    """(stem, "weight" | "bias") of an offset entry; None otherwise."""
    for suffix, param in OFFSET_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], param
    return None


def is_text_encoder_key(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES)


def is_vae_key(key: str) -> bool:
    return key.startswith(VAE_PREFIXES)
