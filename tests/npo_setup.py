"""A tiny positive model, an NPO LoRA for it, and the same two models built independently by hand.

The guided prediction at every step is compared with the formula of its guidance mode (e.g. npo:
uncond(negative) + cfg·(cond(positive) − uncond(negative))) evaluated on `pos_ind` / `neg_ind`: fresh
modules whose weights were set directly (θ and θ + η·δ), sharing nothing with ComfyUI's patching,
cloning or loading.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

import comfy.sample
import comfy.samplers
import nodes

import npo_files
from comfy_selfnpo import tiny_models
from comfy_selfnpo.npo import weights

STRENGTH = 1.5
CFG = 4.0
STEPS = 4
SEED = 5
AG_SCALE = 1.5  # g_ag of mode cfg+autoguidance in the tests


@dataclass
class Setup:
    kind: str
    ckpt: object
    offset: npo_files.LowRankOffset
    npo: weights.NPOWeights
    pos_ind: object
    neg_ind: object
    positive: list
    negative: list
    latent_shape: tuple = (1, 4, 8, 8)

    @property
    def model(self):
        return self.ckpt.model

    def encode(self, text):
        cond, pooled = self.ckpt.clip.encode_from_tokens(self.ckpt.clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    def negative_model(self, strength=STRENGTH):
        neg, _report = weights.make_negative_model(self.model, self.npo, strength=strength)
        return neg


@lru_cache(maxsize=None)
def setup(kind: str) -> Setup:
    ckpt = tiny_models.build_checkpoint(kind, seed=3)
    offset = npo_files.make_npo_offset(ckpt.model, seed=1)
    npo = weights.npo_weights_from_state_dict(npo_files.kohya_state_dict(offset, ckpt.model), "npo.safetensors")
    sd = ckpt.model.model.state_dict()
    dense = offset.dense(sd)
    pos_ind = npo_files.independent_model(tiny_models, kind, 3)
    neg_ind = npo_files.independent_model(tiny_models, kind, 3, {k: sd[k] + STRENGTH * dense[k] for k in dense})
    s = Setup(kind, ckpt, offset, npo, pos_ind, neg_ind, None, None)
    s.positive = s.encode("a red cube")
    s.negative = s.encode("")
    return s


class StepRecorder:
    """A post-CFG function that keeps every step's input, sigma, guided prediction and conds."""

    def __init__(self):
        self.steps = []

    def __call__(self, args):
        self.steps.append(dict(x=args["input"].clone(), sigma=args["sigma"].clone(),
                               denoised=args["denoised"].clone(), cond=args["cond"], uncond=args["uncond"]))
        return args["denoised"]

    def attach(self, model):
        m = model.clone()
        m.set_model_sampler_post_cfg_function(self)
        return m


@torch.no_grad()
def predict(patcher, conds, x, sigma):
    """ComfyUI's own cond batching (areas, masks, ADM) on one independently built model."""
    patcher.model.current_patcher = patcher
    return comfy.samplers.calc_cond_batch(patcher.model, [conds], x, sigma, {})[0]


@torch.no_grad()
def hand_cfg(s: Setup, step, cfg=CFG, negative_model=None):
    neg = s.neg_ind if negative_model is None else negative_model
    d_pos = predict(s.pos_ind, step["cond"], step["x"], step["sigma"])
    d_neg = predict(neg, step["uncond"], step["x"], step["sigma"])
    return d_neg + cfg * (d_pos - d_neg)


@torch.no_grad()
def hand_guided(s: Setup, step, mode: str, cfg=CFG, ag_scale=AG_SCALE):
    """Each mode's guided prediction written out from its formula (issue 11) on the two independent
    models; "plain" is plain CFG on the positive model. At cfg 1 ComfyUI passes no negative prompt:
    the c_neg terms cancel, so they are left out."""
    x, sigma, c, c_neg = step["x"], step["sigma"], step["cond"], step["uncond"]
    d_pos = lambda conds: predict(s.pos_ind, conds, x, sigma)
    d_neg = lambda conds: predict(s.neg_ind, conds, x, sigma)
    if c_neg is None:
        assert cfg == 1.0
        return d_pos(c) + ag_scale * (d_pos(c) - d_neg(c)) if mode == "cfg+autoguidance" else d_pos(c)
    if mode == "npo":
        return d_neg(c_neg) + cfg * (d_pos(c) - d_neg(c_neg))
    if mode == "autoguidance":
        return d_neg(c) + cfg * (d_pos(c) - d_neg(c))
    if mode == "cfg+autoguidance":
        return d_pos(c_neg) + cfg * (d_pos(c) - d_pos(c_neg)) + ag_scale * (d_pos(c) - d_neg(c))
    assert mode == "plain"
    return d_pos(c_neg) + cfg * (d_pos(c) - d_pos(c_neg))


def rel_err(a, b) -> float:
    """Largest difference relative to the largest value of `b`. The guidance tests allow 1e-4 between
    computations equal in exact arithmetic that differ in batching, low-rank vs merged weights or
    summation order: measured with 1, 2 and 4 threads, the worst is 4.8e-6 (test_npo_guidance), most
    are 1e-6 to 4e-6, and several are bit-identical; 1e-4 leaves 20x for other CPUs' kernels."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def latent(shape=(1, 4, 8, 8)):
    return {"samples": torch.zeros(shape)}


def ksample(model, s: Setup, cfg=CFG, positive=None, negative=None, steps=STEPS):
    (out,) = nodes.common_ksampler(model, SEED, steps, cfg, "euler", "normal",
                                   positive or s.positive, negative or s.negative, latent(s.latent_shape))
    return out["samples"]


def guider_sample(guider, s: Setup, cfg=CFG, positive=None, negative=None, steps=STEPS, sigmas=None):
    """What SamplerCustomAdvanced does with a GUIDER, a sampler and sigmas (default: `steps` of the
    normal scheduler)."""
    guider.set_conds(positive or s.positive, negative or s.negative)
    guider.set_cfg(cfg)
    lat = latent(s.latent_shape)["samples"]
    noise = comfy.sample.prepare_noise(lat, SEED)
    if sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps)
    sampler = comfy.samplers.sampler_object("euler")
    return guider.sample(noise, lat, sampler, sigmas, disable_pbar=True, seed=SEED)




# --- flow DiTs and video models ---------------------------------------------------------------------

def dit_lora_offset(patcher, seed: int, rank: int = 4, alpha: float = 2.0, scale: float = 0.5) -> npo_files.LowRankOffset:
    """A random low-rank offset δ on every attention projection (a Linear weight under a module
    named *attn* / *attention*) of a tiny DiT, and on its first convolution (the patch embedding
    of SD3, Wan, HunyuanVideo 1.5) where it has one."""
    sd = patcher.model.state_dict()
    keys = [k for k, w in sd.items() if k.startswith("diffusion_model.") and k.endswith(".weight") and w.ndim == 2
            and any(part.endswith(("attn", "attn1", "attn2", "attention")) for part in k.split("."))]
    keys += [k for k, w in sd.items() if k.startswith("diffusion_model.") and w.ndim >= 4][:1]
    offset = npo_files.lowrank_offset(patcher, keys, rank=rank, alpha=alpha, seed=seed, scale=scale)
    assert len(offset.factors) >= 4, keys
    return offset


def native_lora_state_dict(offset: npo_files.LowRankOffset) -> dict:
    """The offset as a LoRA in ComfyUI-native names (`diffusion_model.<module>.lora_up.weight`)."""
    out = {}
    for key, (up, down, alpha) in offset.factors.items():
        stem = key[: -len(".weight")]
        out.update({f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down, f"{stem}.alpha": torch.tensor(alpha)})
    return out


def with_lora(model, lora: dict, strength: float):
    """`model` + a LoRA state dict, applied as ComfyUI's LoRA loader applies one (comfy.lora key map
    and patches on a clone); every LoRA entry must land on a weight."""
    import comfy.lora

    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    modules = {k.rpartition(".lora_")[0] for k in lora if ".lora_" in k}
    assert patches and len(patches) == len(modules), "LoRA modules that match no weight"
    clone = model.clone()
    assert len(clone.add_patches(patches, strength)) == len(patches)
    return clone


@dataclass
class FamilySetup:
    """A tiny DiT or video model (one expert of a model with several), an NPO LoRA for it in
    ComfyUI-native names, and the hand-built pair: fresh modules holding θ and θ + η·δ."""
    kind: str
    model: object
    clip: object
    offset: npo_files.LowRankOffset
    pos_ind: object
    neg_ind: object
    positive: list
    negative: list
    latent_shape: tuple

    def negative_model(self, strength=STRENGTH):
        return with_lora(self.model, native_lora_state_dict(self.offset), strength)

    def encode(self, text):
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))


@lru_cache(maxsize=None)
def _family_checkpoint(kind: str):
    return tiny_models.build_checkpoint(kind, seed=3)


@lru_cache(maxsize=None)
def family_setup(kind: str, expert: str | None = None, lora_seed: int = 1) -> FamilySetup:
    """`expert`: which diffusion model of a kind with several (wan22_a14b); None: the first."""
    ckpt = _family_checkpoint(kind)
    model = ckpt.experts[expert] if expert else ckpt.model
    offset = dit_lora_offset(model, seed=lora_seed)
    pos_ind = independent_model_with(kind, expert, {})
    dense = offset.dense(model.model.state_dict())
    neg_ind = independent_model_with(kind, expert, {k: STRENGTH * d for k, d in dense.items()})
    s = FamilySetup(kind, model, ckpt.clip, offset, pos_ind, neg_ind, None, None, tiny_models.family(kind).sample_latent)
    s.positive = s.encode("a red cube")
    s.negative = s.encode("")
    return s


def independent_model_with(kind: str, expert: str | None, changes: dict):
    """A fresh build of the kind's (expert's) model with θ + changes[key] set directly."""
    built = tiny_models.build_experts(kind, seed=3)
    patcher = built[expert or next(iter(built))]
    sd = patcher.model.state_dict()
    patcher.model.load_state_dict({k: sd[k] + d for k, d in changes.items()}, strict=False)
    return patcher
