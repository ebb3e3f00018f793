"""Tiny text encoders: ComfyUI's own text-encoder classes and tokenizers at toy width.

ComfyUI's text encoders read their sizes from `model_options["<name>_model_config"]` and may swap
the inner model class through `model_options["<name>_class"]` (both are ComfyUI's own options), so
the tiny encoders below are ComfyUI's classes with small configs. Tokenizing and scheduled encoding
(`clip.tokenize`, `clip.encode_from_tokens_scheduled`) are ComfyUI's code throughout.

Every tiny family encoder has hidden width `TE_WIDTH` (32), which no real encoder has: that is how
`is_tiny_text_encoder` recognises a tiny text-encoder file.

Substitutes, where ComfyUI's classes cannot be tiny:
  * Qwen2.5-VL (Qwen-Image, HunyuanVideo 1.5): ComfyUI's class always builds the full-size vision
    tower (~670 M parameters); the tiny one is the same LLM (ComfyUI's `Llama2_` with the
    Qwen2.5-VL config) without it, plugged in through the `qwen25_7b_class` option.
  * UMT5 (Wan) and Gemma 2 (Lumina 2) tokenize with a sentencepiece model that a real text-encoder
    file carries; ComfyUI ships none, so the tiny ones use ComfyUI's T5-pile sentencepiece model
    (32 000 pieces) as their vocabulary.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

import comfy.sd1_clip
import comfy.supported_models_base
import comfy.text_encoders.llama

TE_WIDTH = 32

# --- the SD1.x/SD2/SDXL kinds (hidden sizes add up to the UNet's context_dim) -------------------
CLIP_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
              "num_hidden_layers": 3, "projection_dim": 64}
CLIP_L_SMALL = {**CLIP_SMALL, "hidden_size": TE_WIDTH, "intermediate_size": 64, "projection_dim": 32}
CLIP_G_SMALL_XL = {"hidden_size": 96, "intermediate_size": 128, "num_attention_heads": 2,
                   "num_hidden_layers": 3, "projection_dim": 64}
SDXL_POOLED_DIM = CLIP_G_SMALL_XL["hidden_size"]  # ComfyUI pools clip_g to its hidden width

# --- the DiT families --------------------------------------------------------------------------
# CLIP-G with 32 layers: ComfyUI tells CLIP-G from CLIP-L by a 31st layer (`detect_te_model`,
# SD3ClipModel.load_sd), so a tiny CLIP-G file needs that depth to load as CLIP-G.
CLIP_G_SMALL = {"hidden_size": TE_WIDTH, "intermediate_size": 64, "num_attention_heads": 2,
                "num_hidden_layers": 32, "projection_dim": 32, "hidden_act": "gelu"}
# The T5 tokenizer's ids, and the T5-pile sentencepiece ids, stay below 32 128.
T5_SMALL = {"d_model": TE_WIDTH, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2, "vocab_size": 32128}
GEMMA2_SMALL = {"vocab_size": 32000, "hidden_size": TE_WIDTH, "intermediate_size": 64,
                "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1}
# Four key/value heads of ComfyUI's fixed head_dim 128 give ComfyUI's Qwen2.5-7B signature
# (k_proj bias of 512), so `detect_te_model` recognises a tiny file as Qwen2.5-VL 7B.
QWEN25_VL_SMALL = {"hidden_size": TE_WIDTH, "intermediate_size": 64, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 4}


class TextOnlyQwen25VL(comfy.text_encoders.llama.Qwen25_7BVLI):
    """ComfyUI's Qwen2.5-VL 7B language model without its vision tower (text prompts never use it)."""

    def __init__(self, config_dict, dtype, device, operations):
        torch.nn.Module.__init__(self)
        config = comfy.text_encoders.llama.Qwen25_7BVLI_Config(**config_dict)
        self.num_layers = config.num_hidden_layers
        self.model = comfy.text_encoders.llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
        self.dtype = dtype


class QwenVLTextEncoder(comfy.sd1_clip.SDClipModel):
    """ComfyUI's Qwen2.5-VL text-encoder wrapper (pad token, attention mask, no final layer norm)
    around `TextOnlyQwen25VL`; `layer`/`layer_idx` as the family's own wrapper sets them."""

    def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
        super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
                         special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=TextOnlyQwen25VL,
                         enable_attention_masks=True, return_attention_masks=True, model_options=model_options)


# Every family encoder's sizes, by ComfyUI's option names; passed whole to ComfyUI's text-encoder
# loader for tiny files (see files.py), so each name has one tiny config.
FAMILY_TE_OPTIONS = {
    "clip_l_model_config": CLIP_L_SMALL,
    "clip_g_model_config": CLIP_G_SMALL,
    "t5xxl_model_config": T5_SMALL,
    "umt5xxl_model_config": T5_SMALL,
    "gemma2_2b_model_config": GEMMA2_SMALL,
    "qwen25_7b_model_config": QWEN25_VL_SMALL,
    "qwen25_7b_class": QwenVLTextEncoder,
}
# HunyuanVideo 1.5 reads the Qwen2.5-VL hidden states three layers from the end (ComfyUI's
# hunyuan_image wrapper); Qwen-Image reads the last layer.
HUNYUAN15_TE_OPTIONS = {**FAMILY_TE_OPTIONS,
                        "qwen25_7b_class": functools.partial(QwenVLTextEncoder, layer="hidden", layer_idx=-3)}


def with_options(base_cls, options: dict):
    """A ComfyUI text-encoder class whose `model_options` default to `options` (the caller's win).
    Used as `ClipTarget.clip`, so ComfyUI's checkpoint loader builds the tiny encoder too."""

    class SmallTextEncoder(base_cls):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            merged = {**options, **model_options}
            super().__init__(device=device, dtype=dtype, model_options=merged, **kwargs)

    SmallTextEncoder.__name__ = f"Small{base_cls.__name__}"
    return SmallTextEncoder


def clip_target(tokenizer, text_encoder, options: dict = FAMILY_TE_OPTIONS):
    return comfy.supported_models_base.ClipTarget(tokenizer, with_options(text_encoder, options))


@functools.cache
def _pile_spiece_bytes() -> bytes:
    import comfy.text_encoders.sd3_clip as anchor  # any module in ComfyUI's text_encoders folder

    return (Path(anchor.__file__).parent / "t5_pile_tokenizer" / "tokenizer.model").read_bytes()


def spiece_tokenizer_data() -> dict:
    """`tokenizer_data` for the sentencepiece tokenizers (UMT5, Gemma): the vocabulary a real
    text-encoder file carries under `spiece_model`, here ComfyUI's shipped T5-pile model."""
    return {"spiece_model": torch.frombuffer(bytearray(_pile_spiece_bytes()), dtype=torch.uint8)}


_EMBEDDING_KEYS = ("text_model.embeddings.token_embedding.weight", "shared.weight", "model.embed_tokens.weight")


def is_tiny_text_encoder(state_dict: dict) -> bool:
    """True for a tiny family text-encoder state dict (CLIP, T5/UMT5 or LLM embeddings of width 32)."""
    for key in _EMBEDDING_KEYS:
        weight = state_dict.get(key)
        if weight is not None and weight.ndim == 2 and weight.shape[1] == TE_WIDTH:
            return True
    return False


def is_tiny_t5(state_dict: dict) -> bool:
    """A tiny T5/UMT5 encoder: ComfyUI recognises T5-XXL only by its 24th block's width."""
    return "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in state_dict and is_tiny_text_encoder(state_dict)
