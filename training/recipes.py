"""The method's recipe per model family (docs/algorithm.md §3a): what Self-NPO fixes for a model,
as opposed to how a run fits a GPU (the memory presets in config.py).

A `Recipe` holds the values of the hyper-parameters a config leaves at "auto" (None, or "auto" for
text choices): corruption guidance w, the teacher's unconditional input, the training resolution and
frames, the crop (SDXL passes its crop coordinates as micro-conditioning), the full-mode learning
rate and weight decay, the precision "auto" means. The EMA teacher (decay 0.999), the pseudo-Huber
loss (c = 0.001), N = 25 and K = 5 are the same for every family and are TDFTConfig's own defaults.

SD1.x/SD2 and SDXL are the authors' released recipes (Self-NPO/train.sh, train_xl.sh). The DiT and
video rows are this pack's choices; `why` says on what they rest (README's family table prints it).
"""
from __future__ import annotations

from dataclasses import dataclass

LORA_LEARNING_RATE = 1e-4  # LoRA starts at zero and needs a much larger rate than full fine-tuning
VIDEO_FRAMES = 17          # 4·4 + 1: a short clip every c = 4 and c = 8 video VAE takes (Wan, HunyuanVideo, LTXV)


@dataclass(frozen=True)
class Recipe:
    name: str
    corruption_guidance: float
    uncond: str                      # "empty_prompt" | "zeros" (text embeddings and pooled output zeroed)
    resolution: int
    learning_rate: float             # full mode (LoRA runs: LORA_LEARNING_RATE)
    weight_decay: float
    precision: str = "bf16"          # what mixed_precision "auto" means
    frames: int = 1                  # pixel frames per sample (video families: VIDEO_FRAMES)
    crop: str = "center"             # "center" | "random" (coordinates passed as SDXL micro-conditioning)
    why: str = ""

    def values(self, mode: str) -> dict:
        """The config values this recipe gives (TDFTConfig field -> value) for a run of `mode`."""
        return {"corruption_guidance": self.corruption_guidance, "uncond": self.uncond,
                "resolution": self.resolution, "frames": self.frames, "crop": self.crop,
                "learning_rate": self.learning_rate if mode == "full" else LORA_LEARNING_RATE,
                "weight_decay": self.weight_decay, "mixed_precision": self.precision}


_FLOW_W = ("w = −1 (the unconditional branch alone, one teacher evaluation): the paper gives no value for flow "
           "models; −1 keeps the teacher's targets within the model's own predictions at the lowest cost "
           "(not tuned on real models: try −2 … −5)")
_EMPTY = "the empty prompt, which is how ComfyUI samples this family's unconditional branch"

SD15 = Recipe("SD1.5 (authors)", -1.0, "empty_prompt", 512, 1e-6, 1e-3, precision="fp16",
              why="the authors' SD1.5 recipe (Self-NPO/train.py, train.sh)")
SD2 = Recipe("SD2 (authors' SD1.5)", -1.0, "empty_prompt", 512, 1e-6, 1e-3, precision="fp16",
             why="the authors' SD1.5 recipe; the paper has no SD2 run (768-v models: set resolution 768)")
SDXL = Recipe("SDXL (authors)", -5.0, "zeros", 1024, 1e-7, 0.0, precision="fp16", crop="random",
              why="the authors' SDXL recipe (Self-NPO/train_xl.py, train_xl.sh): zeroed text embeddings and "
                  "pooled output, random crops passed as micro-conditioning")
SD3 = Recipe("SD3 / SD3.5", -1.0, "empty_prompt", 1024, 1e-6, 1e-3,
             why=f"{_FLOW_W}; {_EMPTY}; 1024 px, SD3.5's native size")
QWEN_IMAGE = Recipe("Qwen-Image", -1.0, "empty_prompt", 1328, 1e-6, 1e-3,
                    why=f"{_FLOW_W}; {_EMPTY}; 1328 px, its native square size")
CHROMA = Recipe("Chroma", -1.0, "empty_prompt", 1024, 1e-6, 1e-3,
                why=f"{_FLOW_W}; {_EMPTY} (Chroma keeps real CFG); 1024 px, its native size")
LUMINA2 = Recipe("Lumina 2", -1.0, "empty_prompt", 1024, 1e-6, 1e-3,
                 why=f"{_FLOW_W}; {_EMPTY}; 1024 px, its native size")
WAN21 = Recipe("Wan 2.1 / Wan 2.2 A14B", -1.0, "empty_prompt", 480, 1e-6, 1e-3, frames=VIDEO_FRAMES,
               why=f"{_FLOW_W}; {_EMPTY}; 480 px (the 480p short side; 720p 14B models: set 720), {VIDEO_FRAMES}-"
                   "frame clips instead of the native 81 (about 5× less memory and time; the negative learns the "
                   "model's per-frame and short-motion failures)")
WAN22_5B = Recipe("Wan 2.2 TI2V-5B", -1.0, "empty_prompt", 704, 1e-6, 1e-3, frames=VIDEO_FRAMES,
                  why=f"{_FLOW_W}; {_EMPTY}; 704 px (the 1280×704 short side), {VIDEO_FRAMES}-frame clips instead "
                      "of the native 121, as for Wan 2.1")
LTXV = Recipe("LTXV", -1.0, "empty_prompt", 512, 1e-6, 1e-3, frames=VIDEO_FRAMES,
              why=f"{_FLOW_W}; {_EMPTY}; 512 px (the 768×512 short side), {VIDEO_FRAMES}-frame clips (8·2 + 1) "
                  "instead of the native 97+")
HUNYUAN_VIDEO15 = Recipe("HunyuanVideo 1.5", -1.0, "empty_prompt", 480, 1e-6, 1e-3, frames=VIDEO_FRAMES,
                         why=f"{_FLOW_W}; {_EMPTY}; 480 px (the 480p short side), {VIDEO_FRAMES}-frame clips "
                             "instead of the native 121")
GUIDANCE_DISTILLED = Recipe("guidance-distilled (refused)", -1.0, "empty_prompt", 1024, 1e-6, 1e-3,
                            why="never trained: no real unconditional branch to corrupt")
GENERIC = Recipe("other (SD1.5 values)", -1.0, "empty_prompt", 512, 1e-6, 1e-3, precision="fp16", frames=0,
                 why="an unknown family: the SD1.5 recipe; frames 0 = 17 when its latents have a time axis")


# Wan 2.2 A14B switches from the high-noise to the low-noise expert at this sigma (= fraction of the
# timesteps, shift applied), as Wan 2.2's own code and ComfyUI's two-sampler workflows do
WAN22_A14B_BOUNDARY = {"t2v": 0.875, "i2v": 0.9}


def expert_boundary(base_model) -> float:
    """Wan 2.2 A14B's switch point for this expert: image-to-video models (Wan 2.1's I2V layout) 0.9."""
    image_to_video = any("I2V" in cls.__name__ for cls in type(base_model.model_config).__mro__)
    return WAN22_A14B_BOUNDARY["i2v" if image_to_video else "t2v"]


def resolve(config, family, base_model=None):
    """The config with every "auto" value made: recipe values from the family's recipe (for the run's
    mode), mixed_precision "auto" as the family's precision, the expert boundary. Values given
    (not None / "auto") are kept: an explicit value always wins. Resolving twice changes nothing."""
    import dataclasses

    from .config import AUTO, recipe_fields

    recipe = family.recipe.values(config.mode)
    values = {name: recipe[name] for name in recipe_fields() if getattr(config, name) in (None, AUTO)}
    if config.frames == 0 and recipe["frames"]:
        values["frames"] = recipe["frames"]
    if config.mixed_precision == AUTO:
        values["mixed_precision"] = recipe["mixed_precision"]
    if config.expert != "none" and config.expert_boundary == 0 and base_model is not None:
        values["expert_boundary"] = expert_boundary(base_model)
    resolved = dataclasses.replace(config, **values)
    resolved.validate()
    return resolved


def resolve_for_model(config, model):
    """`resolve` for a ComfyUI MODEL (a ModelPatcher) or BaseModel: its family from the registry."""
    from .families import family_of

    base_model = getattr(model, "model", model)
    return resolve(config, family_of(base_model), base_model)


def describe_recipe(config, family) -> str:
    """One line for run reports: the recipe a resolved config trains with, and where it comes from."""
    uncond = {"zeros": "zeroed text embeddings and pooled output", "empty_prompt": "the empty prompt"}[config.uncond]
    frames = f", {config.frames} frames" if config.frames > 1 else ""
    expert = f", {config.expert} expert (boundary sigma {config.expert_boundary:g})" if config.expert != "none" else ""
    return (f"recipe {family.recipe.name} for {family.name}: w {config.corruption_guidance:g}, unconditional "
            f"input {uncond}, {config.resolution} px{frames}, {config.crop} crop, lr {config.learning_rate:g} "
            f"({config.mode}), weight decay {config.weight_decay:g}, teacher {config.teacher}, {config.loss} loss, "
            f"{'fp32' if config.mixed_precision == 'no' else config.mixed_precision} precision{expert}")
