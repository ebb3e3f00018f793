"""The example workflows, defined once and written in both forms:

    example_workflows/<title>.json  UI format: what ComfyUI's template browser lists for the pack
                                    (under the title), and what users drag onto the canvas
    workflows/api/<name>.json       API format: POST to /prompt, or `execution.validate_prompt`

Each template has a thumbnail beside it, example_workflows/<title>.jpg (the template browser's
naming), taken in the real frontend by `scripts/frontend_check/check.py --update`.

Regenerate after changing a graph or a node's inputs (the test suite fails when the committed
files differ from what this produces):

    .venv/bin/python workflows/build.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
UI_DIR = HERE.parent / "example_workflows"
API_DIR = HERE / "api"
sys.path.insert(0, str(HERE))
from graph import Graph, ModelFile  # noqa: E402

SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SD15_SELFNPO = "self_npo/sd15_selfnpo_lora.safetensors"
SDXL_SELFNPO = "self_npo/sdxl_selfnpo_lora.safetensors"
# The authors' Diffusion-NPO release for SD1.5 (a PEFT/diffusers LoRA), downloaded into models/loras.
DIFFUSION_NPO_LORA = "loras/sd15_beta500_2kiter.safetensors"
STYLE_LORA = "my_style_lora.safetensors"

# Where the missing-models dialog downloads them from. The Diffusion-NPO file: the authors' release
# folder on Hugging Face (README of github.com/G-U-N/Diffusion-NPO, "Model Zoo"), at the path their
# gen.sh loads it from (weights/sd15/sd15_beta500_2kiter.safetensors).
SD15_MODEL = ModelFile(SD15_CHECKPOINT, "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
                       "v1-5-pruned-emaonly.safetensors", "checkpoints")
SDXL_MODEL = ModelFile(SDXL_CHECKPOINT, "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                       "sd_xl_base_1.0.safetensors", "checkpoints")
DIFFUSION_NPO_MODEL = ModelFile(DIFFUSION_NPO_LORA.split("/", 1)[1], "https://huggingface.co/wangfuyun/Diffusion-NPO/"
                                "resolve/main/weights/sd15/sd15_beta500_2kiter.safetensors", "loras")
DIFFUSION_NPO_RELEASE = "https://huggingface.co/wangfuyun/Diffusion-NPO/tree/main/weights"

# Template titles: the template browser's cards show about 30 characters.
TRAIN_TITLE = "Train a Self-NPO LoRA (SD1.5)"
TRAIN_FIRST = (
    "**Train first.** This workflow needs Self-NPO weights for your checkpoint in `models/self_npo`: "
    f"run the template *{TRAIN_TITLE}* once (or `comfy-selfnpo-train`), then pick "
    "its file in **Self-NPO Negative Model**. The authors' Diffusion-NPO LoRAs "
    f"([download]({DIFFUSION_NPO_RELEASE}), into `models/loras`) work there too."
)

# Wan 2.1 text-to-video (1.3B) and Qwen-Image, as ComfyUI's own examples load them (split files).
WAN_REPACKAGED = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/"
WAN_UNET, WAN_TEXT_ENCODER, WAN_VAE = ("wan2.1_t2v_1.3B_fp16.safetensors", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                       "wan_2.1_vae.safetensors")
WAN_MODELS = [ModelFile(WAN_UNET, WAN_REPACKAGED + "diffusion_models/" + WAN_UNET, "diffusion_models"),
              ModelFile(WAN_TEXT_ENCODER, WAN_REPACKAGED + "text_encoders/" + WAN_TEXT_ENCODER, "text_encoders"),
              ModelFile(WAN_VAE, WAN_REPACKAGED + "vae/" + WAN_VAE, "vae")]
QWEN_REPACKAGED = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/"
QWEN_UNET, QWEN_TEXT_ENCODER, QWEN_VAE = ("qwen_image_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                          "qwen_image_vae.safetensors")
QWEN_MODELS = [ModelFile(QWEN_UNET, QWEN_REPACKAGED + "diffusion_models/" + QWEN_UNET, "diffusion_models"),
               ModelFile(QWEN_TEXT_ENCODER, QWEN_REPACKAGED + "text_encoders/" + QWEN_TEXT_ENCODER, "text_encoders"),
               ModelFile(QWEN_VAE, QWEN_REPACKAGED + "vae/" + QWEN_VAE, "vae")]
QWEN_SELFNPO = "self_npo/qwen_image_selfnpo_lora.safetensors"
WAN_TITLE = "Self-NPO for Wan 2.1 video"
QWEN_TITLE = "Self-NPO with Qwen-Image"

PROMPT = "a photo of a corgi wearing a red scarf, sitting on a wooden bench in a park, soft morning light"
VIDEO_PROMPT = "a corgi wearing a red scarf runs along a beach at sunset, waves rolling in, camera tracking"


SAMPLER = dict(seed=20251124, steps=25, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
# Self-NPO guidance as the paper does it, over the whole run; every workflow shows the knobs
GUIDANCE = dict(residency="auto", rank=0, mode="npo", autoguidance_scale=1.0, start_percent=0.0, end_percent=1.0)
GUIDANCE_NOTE = ("* *mode*: `npo` (the paper: your negative prompt on the negative model), `autoguidance` (the "
                 "negative model on your prompt), `cfg+autoguidance` (plain CFG plus *autoguidance_scale* · "
                 "(model − negative model)); at a high cfg `autoguidance` keeps the most variety (README, *What "
                 "to expect*). *start_percent*/*end_percent* limit Self-NPO to part of the run; outside it a step "
                 "is plain CFG and costs nothing extra.")


def _prompts_and_latent(g: Graph, clip, negative_title: str = "Negative prompt", size: int = 512):
    """Prompt, empty negative prompt (as in the paper) and an empty latent, in the second column."""
    pos = g.add("CLIPTextEncode", "Prompt", at=(1, 2), clip=clip, text=PROMPT)
    neg = g.add("CLIPTextEncode", negative_title, at=(1, 3), clip=clip, text="")
    latent = g.add("EmptyLatentImage", at=(1, 4), width=size, height=size, batch_size=1)
    return pos, neg, latent


def _ksample_and_save(g: Graph, title: str, model, conds, vae, at: tuple[int, int], prefix: str) -> None:
    """KSampler -> VAEDecode -> SaveImage in one row starting at `at`."""
    pos, neg, latent = conds
    column, row = at
    sample = g.add("KSampler", title, at=at, model=model, positive=pos[0], negative=neg[0],
                   latent_image=latent[0], **SAMPLER)
    decoded = g.add("VAEDecode", at=(column + 1, row), samples=sample[0], vae=vae)
    g.add("SaveImage", at=(column + 2, row), images=decoded[0], filename_prefix=prefix)


def sd15_apply_selfnpo_ksampler() -> Graph:
    g = Graph("sd15_selfnpo_ksampler", "Self-NPO with KSampler (SD1.5)",
              "SD1.5 text-to-image: Self-NPO through plain KSampler ('Apply Self-NPO'), beside plain CFG "
              "with the same seed.")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT, models=[SD15_MODEL])
    neg_model = g.add("SelfNPONegativeModelLoader", "Self-NPO Negative Model", model=ckpt[0],
                      npo_weights=SD15_SELFNPO, strength=1.0, merge_weight=0.0)
    npo_model = g.add("SelfNPOApply", "Apply Self-NPO", model=ckpt[0], negative_model=neg_model[0],
                      **GUIDANCE)
    conds = _prompts_and_latent(g, ckpt[1], "Negative prompt (empty, as in the paper)")
    _ksample_and_save(g, "KSampler (Self-NPO)", npo_model[0], conds, ckpt[2], (3, 0), "selfnpo/sd15_npo")
    _ksample_and_save(g, "KSampler (plain CFG)", ckpt[0], conds, ckpt[2], (3, 2), "selfnpo/sd15_plain_cfg")
    g.note("## Self-NPO with KSampler", TRAIN_FIRST,
           "* **Self-NPO Negative Model**: base model + your Self-NPO weights (from `models/self_npo`, "
           "`models/loras` or `models/diffusion_models`). *strength* η scales the NPO offset (1 = as trained).\n"
           "* **Apply Self-NPO** makes any sampler node run CFG's negative branch on the negative model. "
           "*residency*: `separate` keeps a second copy of the weights (+1 model of memory), "
           "`batched_lowrank` shares one copy and applies the NPO LoRA only to the negative rows "
           "(one batched forward, like plain CFG), `auto` picks. *rank* (0 = as stored) truncates "
           "full offsets by SVD for batched mode.\n"
           "* The two KSamplers share seed and settings: the right column is plain CFG for comparison.",
           GUIDANCE_NOTE, at=(0, 2))
    return g


def sdxl_selfnpo_guider() -> Graph:
    g = Graph("sdxl_selfnpo_guider", "Self-NPO CFG Guider (SDXL)",
              "SDXL text-to-image with the 'Self-NPO CFG Guider' and SamplerCustomAdvanced.")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SDXL_CHECKPOINT, models=[SDXL_MODEL])
    neg_model = g.add("SelfNPONegativeModelLoader", "Self-NPO Negative Model", model=ckpt[0],
                      npo_weights=SDXL_SELFNPO, strength=1.0, merge_weight=0.0)
    pos = g.add("CLIPTextEncode", "Prompt", at=(1, 1), clip=ckpt[1], text=PROMPT)
    # the authors' SDXL negative branch (force_zeros_for_empty_prompt), which the SDXL negative model is
    # trained against: text embeddings and pooled output zeroed
    neg = g.add("ConditioningZeroOut", "Negative: zeroed (as the authors)", at=(1, 2), conditioning=pos[0])
    guider = g.add("SelfNPOCFGGuider", "Self-NPO CFG Guider", at=(2, 0), model=ckpt[0],
                   negative_model=neg_model[0], positive=pos[0], negative=neg[0], cfg=7.0,
                   **GUIDANCE)
    noise = g.add("RandomNoise", at=(2, 1), noise_seed=20251124)
    sampler = g.add("KSamplerSelect", at=(2, 2), sampler_name="euler")
    sigmas = g.add("BasicScheduler", at=(2, 3), model=ckpt[0], scheduler="normal", steps=30, denoise=1.0)
    latent = g.add("EmptyLatentImage", at=(2, 4), width=1024, height=1024, batch_size=1)
    out = g.add("SamplerCustomAdvanced", at=(3, 0), noise=noise[0], guider=guider[0], sampler=sampler[0],
                sigmas=sigmas[0], latent_image=latent[0])
    g.add("SaveImage", at=(5, 0), images=g.add("VAEDecode", at=(4, 0), samples=out[0], vae=ckpt[2])[0],
          filename_prefix="selfnpo/sdxl_npo")
    g.note("## Self-NPO CFG Guider (SDXL)", TRAIN_FIRST,
           "The guider computes `uncond(negative model) + cfg · (cond(model) − uncond(negative model))`. "
           "Pooled/ADM conditioning, ControlNet, area and mask conditioning reach the negative model "
           "exactly as they reach the positive one. At cfg = 1 the negative branch is skipped.",
           "Self-NPO SDXL weights were trained with corruption guidance w = −5 (the published recipe).",
           "* **Negative: zeroed**: the negative branch runs on zeroed conditioning (text embeddings and pooled "
           "output), as the authors sample SDXL and as the SDXL negative model is trained. For a negative prompt "
           "instead, feed a CLIPTextEncode to the guider's *negative*.",
           GUIDANCE_NOTE, at=(0, 2))
    return g


def train_then_sample() -> Graph:
    g = Graph("train_selfnpo_lora_then_sample", TRAIN_TITLE,
              "Train a Self-NPO LoRA (TDFT) from the loaded checkpoint, then sample with it in the same graph.")
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT, models=[SD15_MODEL])
    train = g.add("SelfNPOTrainTDFT", "Self-NPO Train (TDFT)", model=ckpt[0], clip=ckpt[1], vae=ckpt[2],
                  **TRAIN_NODE_INPUTS)
    npo_model = g.add("SelfNPOApply", "Apply Self-NPO", at=(2, 0), model=ckpt[0], negative_model=train[0],
                      **GUIDANCE)
    conds = _prompts_and_latent(g, ckpt[1])
    _ksample_and_save(g, "KSampler (Self-NPO)", npo_model[0], conds, ckpt[2], (3, 0), "selfnpo/trained_npo")
    g.add("SaveImage", "Loss curve", at=(2, 2), images=train[2], filename_prefix="selfnpo/loss_curve")
    g.note(*TRAIN_NOTE, GUIDANCE_NOTE, at=(0, 2))
    return g


def diffusion_npo_release_with_beta() -> Graph:
    g = Graph("diffusion_npo_release_with_beta", "Diffusion-NPO release (SD1.5)",
              "A downloaded Diffusion-NPO LoRA (the authors' PEFT release format) as the negative model, "
              "with the merge weight β exposed.")
    # the loader's widget says "loras/<file>": the download is listed for the whole workflow instead
    g.models.append(DIFFUSION_NPO_MODEL)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15_CHECKPOINT, models=[SD15_MODEL])
    styled = g.add("LoraLoaderModelOnly", "Your usual LoRA (positive model)", model=ckpt[0],
                   lora_name=STYLE_LORA, strength_model=0.8)
    neg_model = g.add("SelfNPONegativeModelLoader", "Self-NPO Negative Model (β)", at=(2, 0), model=styled[0],
                      npo_weights=DIFFUSION_NPO_LORA, strength=1.0, merge_weight=0.5, base_model=ckpt[0])
    npo_model = g.add("SelfNPOApply", "Apply Self-NPO", at=(3, 0), model=styled[0], negative_model=neg_model[0],
                      **GUIDANCE)
    conds = _prompts_and_latent(g, ckpt[1])
    _ksample_and_save(g, "KSampler (Diffusion-NPO)", npo_model[0], conds, ckpt[2], (4, 0),
                      "selfnpo/diffusion_npo_beta")
    g.note("## A Diffusion-NPO release as the negative model",
           "The authors' SD1.5 LoRA (PEFT/diffusers keys, `unet.…lora_A/lora_B`) goes in `models/loras`: "
           "ComfyUI offers the download when it is missing "
           f"([all releases]({DIFFUSION_NPO_RELEASE})). Pick your own LoRA in the first loader.",
           "* **strength** η scales the NPO offset.\n"
           "* **merge_weight** β: θ_neg = θ_pos + η·δ_npo − β·(θ_pos − θ_base). With β = 0 the negative "
           "model keeps everything the positive model has (here: your LoRA); β = 1 removes it again, so "
           "the negative branch is base + NPO. Connect **base_model** (the checkpoint without your LoRAs) "
           "whenever β ≠ 0.",
           GUIDANCE_NOTE, at=(0, 2))
    return g


# The lora-12gb preset's values, as the training node shows them for it (a test checks they are the preset's)
LORA_12GB = dict(steps=1000, learning_rate=1e-4, lora_rank=16, teacher="ema")
# Prompt-only training (this pack's extension), LoRA sized for a 12 GB GPU; everything else as the preset
# and the model family's recipe say (resolution / corruption_guidance 0).
TRAIN_NODE_INPUTS: dict = dict(
    data_folder="",
    prompts="\n".join([
        "a photo of a corgi wearing a red scarf",
        "a watercolor painting of a lighthouse at dusk",
        "a portrait of an old fisherman, dramatic lighting",
        "a bowl of ramen on a wooden table, top view",
        "a futuristic city skyline at night, neon lights",
        "a cozy reading nook with a cat sleeping on a blanket",
    ]),
    preset="lora-12gb", **LORA_12GB, seed=0,
    output_name="sd15_selfnpo_lora", save_every=100, preview_every=100, overrides="", input_folder="",
    resolution=0, corruption_guidance=0.0, on_existing_run="continue",
)
TRAIN_NOTE = (
    "## Train a Self-NPO LoRA, then sample with it",
    "**Self-NPO Train (TDFT)** fine-tunes a copy of the loaded model on its own corrupted generations "
    "(corruption guidance w = −1 for SD1.5, −5 for SDXL; K = 5 truncated teacher steps per sample). "
    "Its *negative_model* output feeds **Apply Self-NPO** directly.",
    "* *data_folder*: images with same-name `.txt` captions (the authors' way: every rollout starts from a "
    "noised real image); empty = prompt-only mode from *prompts*, this pack's extension (empty prompts: the "
    "pack's default list).\n"
    "* *preset*: how the run fits your GPU: `sd15` / `sdxl` are the authors' published full fine-tuning runs; "
    "`lora-8gb` … `lora-24gb` train a LoRA sized for that GPU. The recipe (w, unconditional input, "
    "resolution, learning rate) comes from the model's family; the node shows it before training starts. "
    "*steps*, *learning_rate* (0 = the recipe's), *lora_rank*, *teacher* (EMA of the student, or the "
    "frozen base), *resolution* and *corruption_guidance* (0 = the recipe's) override them; *overrides* takes "
    "any other setting as `key = value` lines.\n"
    "* Weights go to `models/self_npo/<output_name>.safetensors` (listed by the loader at once). "
    "Re-running with the same name does what *on_existing_run* says (continue, start over keeping the old "
    "run aside, or continue with changed data); cancelling saves a resumable checkpoint.\n"
    "* *preview_every*: shows the first prompt with plain CFG and with NPO-CFG in the progress bar."
)

def _split_files_model(g: Graph, unet: ModelFile, text_encoder: ModelFile, vae: ModelFile, clip_type: str):
    """UNETLoader, CLIPLoader and VAELoader in the first column, for a model shipped as split files."""
    model = g.add("UNETLoader", "Load diffusion model", at=(0, 0), unet_name=unet.name, weight_dtype="default",
                  models=[unet])
    clip = g.add("CLIPLoader", "Load text encoder", at=(0, 1), clip_name=text_encoder.name, type=clip_type,
                 device="default", models=[text_encoder])
    vae_node = g.add("VAELoader", "Load VAE", at=(0, 2), vae_name=vae.name, models=[vae])
    return model, clip, vae_node


def wan_train_then_sample_video() -> Graph:
    g = Graph("wan21_t2v_train_selfnpo_then_sample", WAN_TITLE,
              "Wan 2.1 text-to-video: train a Self-NPO LoRA data-free on the loaded model, then sample a clip with "
              "it beside plain CFG (same seed), both saved as videos.")
    model, clip, vae = _split_files_model(g, *WAN_MODELS, clip_type="wan")
    shifted = g.add("ModelSamplingSD3", "Shift (as Wan samples)", at=(1, 0), model=model[0], shift=8.0)
    train = g.add("SelfNPOTrainTDFT", "Self-NPO Train (TDFT)", at=(2, 0), model=shifted[0], clip=clip[0],
                  vae=vae[0], **WAN_TRAIN_INPUTS)
    npo = g.add("SelfNPOApply", "Apply Self-NPO", at=(3, 0), model=shifted[0], negative_model=train[0],
                **GUIDANCE)
    pos = g.add("CLIPTextEncode", "Prompt", at=(1, 2), clip=clip[0], text=VIDEO_PROMPT)
    neg = g.add("CLIPTextEncode", "Negative prompt (empty, as in the paper)", at=(1, 3), clip=clip[0], text="")
    latent = g.add("EmptyHunyuanLatentVideo", "Empty video (33 frames, 480p)", at=(1, 4), width=832, height=480,
                   length=33, batch_size=1)
    for title, sampled_model, row, prefix in (("KSampler (Self-NPO)", npo[0], 0, "selfnpo/wan_npo"),
                                              ("KSampler (plain CFG)", shifted[0], 2, "selfnpo/wan_plain_cfg")):
        sample = g.add("KSampler", title, at=(4, row), model=sampled_model, positive=pos[0], negative=neg[0],
                       latent_image=latent[0], seed=20251124, steps=30, cfg=6.0, sampler_name="uni_pc",
                       scheduler="simple", denoise=1.0)
        frames = g.add("VAEDecode", at=(5, row), samples=sample[0], vae=vae[0])
        video = g.add("CreateVideo", at=(6, row), images=frames[0], fps=16.0)
        g.add("SaveVideo", at=(7, row), video=video[0], filename_prefix=prefix, format="auto", codec="auto")
    g.add("SaveImage", "Loss curve", at=(3, 2), images=train[2], filename_prefix="selfnpo/wan_loss_curve")
    g.note("## Self-NPO for Wan 2.1 text-to-video",
           "**Self-NPO Train (TDFT)** trains a LoRA on the loaded Wan model with no data at all: it continues "
           "buffered trajectories of its own generations (17-frame clips) with corruption guidance w = −1 "
           "(the unconditional branch alone). Video models are data-free by nature; a folder of captioned clips "
           "(`.mp4`/`.webm`/`.gif` + `.txt`) also works.",
           "* The trainer samples the model as given: the shift of **ModelSamplingSD3** (8, as ComfyUI's Wan "
           "examples use) applies to training too.\n"
           "* *overrides*: `frames` (4·k+1 for Wan's VAE), `resolution`, `fps` of data clips, or any other "
           "setting. The LoRA lands in `models/self_npo`; rerunning with the same name resumes.\n"
           "* **Apply Self-NPO** then runs CFG's negative branch on the trained negative model.",
           GUIDANCE_NOTE, at=(0, 3))
    return g


def qwen_image_selfnpo() -> Graph:
    g = Graph("qwen_image_selfnpo", QWEN_TITLE,
              "Qwen-Image text-to-image with Self-NPO through KSampler, beside plain CFG with the same seed.")
    model, clip, vae = _split_files_model(g, *QWEN_MODELS, clip_type="qwen_image")
    shifted = g.add("ModelSamplingAuraFlow", "Shift (as Qwen-Image samples)", at=(1, 0), model=model[0], shift=3.1)
    neg_model = g.add("SelfNPONegativeModelLoader", "Self-NPO Negative Model", at=(2, 0), model=shifted[0],
                      npo_weights=QWEN_SELFNPO, strength=1.0, merge_weight=0.0)
    npo = g.add("SelfNPOApply", "Apply Self-NPO", at=(3, 0), model=shifted[0], negative_model=neg_model[0],
                **GUIDANCE)
    pos = g.add("CLIPTextEncode", "Prompt", at=(1, 2), clip=clip[0], text=PROMPT)
    neg = g.add("CLIPTextEncode", "Negative prompt (empty, as in the paper)", at=(1, 3), clip=clip[0], text="")
    latent = g.add("EmptySD3LatentImage", at=(1, 4), width=1328, height=1328, batch_size=1)
    for title, sampled_model, row, prefix in (("KSampler (Self-NPO)", npo[0], 0, "selfnpo/qwen_npo"),
                                              ("KSampler (plain CFG)", shifted[0], 2, "selfnpo/qwen_plain_cfg")):
        sample = g.add("KSampler", title, at=(4, row), model=sampled_model, positive=pos[0], negative=neg[0],
                       latent_image=latent[0], seed=20251124, steps=20, cfg=2.5, sampler_name="euler",
                       scheduler="simple", denoise=1.0)
        decoded = g.add("VAEDecode", at=(5, row), samples=sample[0], vae=vae[0])
        g.add("SaveImage", at=(6, row), images=decoded[0], filename_prefix=prefix)
    g.note("## Self-NPO with Qwen-Image",
           "**Train first.** This workflow needs Self-NPO weights for Qwen-Image in `models/self_npo`: train them "
           "with the **Self-NPO Train (TDFT)** node on this model (data-free from prompts, e.g. preset `lora-24gb`) "
           "or with `comfy-selfnpo-train --diffusion-model qwen_image…safetensors --text-encoder qwen_2.5_vl…"
           "safetensors --clip-type qwen_image --vae qwen_image_vae.safetensors --prompts prompts.txt`, then pick "
           "the file in **Self-NPO Negative Model**.",
           "* Qwen-Image runs real CFG (cfg 2.5 here): its negative branch is where Self-NPO acts "
           "(`cfg+autoguidance` is the one mode that also acts at cfg 1).",
           GUIDANCE_NOTE, at=(0, 3))
    return g


# Data-free Wan training: a LoRA for a 12 GB GPU on 17-frame clips at 480 px.
WAN_TRAIN_INPUTS: dict = dict(
    data_folder="",
    prompts="\n".join([
        "a corgi running along a beach at sunset",
        "a timelapse of clouds over snowy mountains",
        "a chef chopping vegetables in a busy kitchen",
        "a red car driving through a rainy city at night",
        "a hummingbird hovering near a pink flower, slow motion",
    ]),
    preset="lora-12gb", **LORA_12GB, seed=0,
    output_name="wan21_selfnpo_lora", save_every=100, preview_every=0, overrides="frames = 17\nresolution = 480",
    input_folder="", resolution=0, corruption_guidance=0.0, on_existing_run="continue",
)

GRAPHS = [sd15_apply_selfnpo_ksampler, sdxl_selfnpo_guider, train_then_sample, diffusion_npo_release_with_beta,
          wan_train_then_sample_video, qwen_image_selfnpo]


def graphs() -> list[Graph]:
    return [make() for make in GRAPHS]


def build_all(registry: dict, display_names: dict) -> dict[str, tuple[Graph, dict, dict]]:
    """name -> (graph, ui, api) for every example workflow (`registry`/`display_names`: ComfyUI's
    NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS)."""
    return {g.name: (g, g.to_ui(registry, display_names), g.to_api(display_names)) for g in graphs()}


def dump(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_all(registry: dict, display_names: dict) -> list[Path]:
    written = []
    UI_DIR.mkdir(parents=True, exist_ok=True)
    API_DIR.mkdir(parents=True, exist_ok=True)
    for graph, ui, api in build_all(registry, display_names).values():
        for path, data in ((UI_DIR / f"{graph.title}.json", ui), (API_DIR / f"{graph.name}.json", api)):
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(dump(data))
            os.replace(tmp, path)
            written.append(path)
    return written


def _boot_registry() -> tuple[dict, dict]:
    import asyncio

    pack_root = HERE.parent
    sys.path.insert(0, str(pack_root))
    from comfyui_env import ensure_comfyui

    ensure_comfyui(cpu=True)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(pack_root))):
        raise SystemExit("ComfyUI could not import the pack")
    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


if __name__ == "__main__":
    for path in write_all(*_boot_registry()):
        print(path.relative_to(HERE.parent))
