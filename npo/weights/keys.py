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
# LyCORIS LoHa / LoKr layers (ComfyUI's loader reads them with comfy.weight_adapter's LoHa/LoKr adapters,
# which do the math): algorithm -> the parts a complete layer has, each part one of its alternative
# sets of entries (LoKr writes a factor whole or as a low-rank pair); Tucker cores are optional extras
LYCORIS_LAYERS = {
    "hada": ((("hada_w1_a", "hada_w1_b"),), (("hada_w2_a", "hada_w2_b"),)),
    "lokr": ((("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")), (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))),
}
LYCORIS_ROLES = tuple(sorted({role for parts in LYCORIS_LAYERS.values() for part in parts for alt in part
                              for role in alt} | {"hada_t1", "hada_t2", "lokr_t2"}))


def lora_role(key: str) -> tuple[str, str] | None:
    """(stem, role) of a LoRA entry, role one of down/up/mid/alpha/dora_scale or a LyCORIS entry's name
    (hada_w1_a, lokr_w1, ...); None otherwise."""
    for down, up in LORA_LAYOUTS:
        for suffix, role in ((down, "down"), (up, "up")):
            if key.endswith(suffix):
                return key[: -len(suffix)], role
    for suffix, role in LORA_EXTRAS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    for role in LYCORIS_ROLES:
        if key.endswith("." + role):
            return key[: -len(role) - 1], role
    return None


def lycoris_algorithm(roles) -> str | None:
    """"hada" (LoHa) or "lokr" (LoKr) when a layer's entries are LyCORIS ones; None otherwise."""
    return next((algo for algo in LYCORIS_LAYERS if any(r.startswith(algo + "_") for r in roles)), None)


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
