"""'Self-NPO CFG Guider' (GUIDER) and 'Apply Self-NPO' (MODEL -> MODEL)."""
from __future__ import annotations

from comfy_api.latest import io

from ..npo.guidance import MODES, RESIDENCIES, SelfNPOGuider, apply_self_npo

_RESIDENCY_TOOLTIP = ("How the negative model's weights are held. separate: its own copy (+1 model of memory). "
                      "batched_lowrank: one copy of the weights, the NPO change applied to the negative model's "
                      "rows of the batch (as fast as plain CFG). auto: batched for LoRA-type changes (diffusers LoRAs on fused "
                      "qkv layers included), else separate.")
_RANK_TOOLTIP = ("batched_lowrank only: full-rank offsets are reduced by SVD to this rank (the relative error is "
                 "logged). 0 keeps them exact.")
_MODE_TOOLTIP = (
    "npo (the Self-NPO paper, default): the negative model replaces the model on the negative prompt; CFG then "
    "steers away from what the negative model makes of your negative prompt. Use it as you use plain CFG; in the "
    "pack's benchmark it beats plain CFG at the scale where CFG does best, and loses diversity faster above it.\n"
    "autoguidance: the negative model runs on your positive prompt (autoguidance, Karras et al. 2024: guidance "
    "away from a weaker version of the same model); the negative prompt has no effect and cfg scales the "
    "distance from the negative model. The benchmark's best at every scale, and the more so the higher the "
    "scale: for a high cfg without the usual loss of variety, when you need no negative prompt.\n"
    "cfg+autoguidance: plain CFG with your negative prompt on the positive model, plus an autoguidance term with "
    "its own scale (autoguidance_scale). Keeps your negative prompt working and adds Self-NPO on top; the only "
    "mode that acts at cfg 1 (e.g. guidance-distilled models). At a low cfg it gives the prompt adherence of a "
    "higher one with more variety left. Costs a third prediction per step.\n"
    "Numbers: README, 'What to expect'.")
_AG_SCALE_TOOLTIP = ("cfg+autoguidance only: weight of the autoguidance term (positive model − negative model, "
                     "both on the positive prompt). 0 gives plain CFG.")
_START_TOOLTIP = ("Where in sampling Self-NPO starts to act, as a fraction of the model's noise schedule (0 = pure "
                  "noise, 1 = the end), as in ComfyUI's ControlNet and conditioning ranges. Steps outside "
                  "start–end are plain CFG on the positive model and cost nothing extra. In the pack's benchmark "
                  "a guidance interval (Kynkäänniemi et al. 2024) improved no mode over the whole run (0–1, the "
                  "default); it only softened cfg+autoguidance.")
_END_TOOLTIP = "Where in sampling Self-NPO stops acting (1 = the end of the noise schedule). See start_percent."


def _inputs():
    # optional with defaults: workflows saved before these inputs existed still load and validate
    return [
        io.Combo.Input("residency", options=list(RESIDENCIES), default="auto", tooltip=_RESIDENCY_TOOLTIP,
                       advanced=True),
        io.Int.Input("rank", default=0, min=0, max=4096, tooltip=_RANK_TOOLTIP, advanced=True),
        io.Combo.Input("mode", options=list(MODES), default="npo", optional=True, tooltip=_MODE_TOOLTIP),
        io.Float.Input("autoguidance_scale", default=1.0, min=0.0, max=100.0, step=0.05, round=0.01,
                       optional=True, tooltip=_AG_SCALE_TOOLTIP),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                       tooltip=_START_TOOLTIP),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip=_END_TOOLTIP),
    ]


_MODEL_TOOLTIP = "The model to sample (with all its LoRAs); its CFG positive branch runs on it."
_NEGATIVE_MODEL_TOOLTIP = ("The Self-NPO negative model ('Self-NPO Negative Model' or 'Self-NPO Train (TDFT)'); CFG's "
                           "negative branch runs on it.")
SEARCH_ALIASES = ["NPO", "Self-NPO", "Diffusion-NPO", "negative model", "negative LoRA", "autoguidance",
                  "negative preference"]


def _guidance_options(residency, rank, mode, autoguidance_scale, start_percent, end_percent) -> dict:
    return dict(residency=residency, rank=rank or None, mode=mode, autoguidance_scale=autoguidance_scale,
                start_percent=start_percent, end_percent=end_percent)


class SelfNPOCFGGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelfNPOCFGGuider",
            display_name="Self-NPO CFG Guider",
            category="sampling/self_npo",
            search_aliases=SEARCH_ALIASES,
            description="CFG whose negative branch runs on the Self-NPO negative model (for SamplerCustomAdvanced).",
            inputs=[
                io.Model.Input("model", tooltip=_MODEL_TOOLTIP),
                io.Model.Input("negative_model", tooltip=_NEGATIVE_MODEL_TOOLTIP),
                io.Conditioning.Input("positive", tooltip="The prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning (empty in the paper); "
                                                          "mode npo evaluates it on the negative model."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The guidance scale g. At 1 CFG skips the negative branch (and with it "
                                       "Self-NPO, except in mode cfg+autoguidance)."),
                *_inputs(),
            ],
            outputs=[io.Guider.Output(tooltip="A GUIDER for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, negative_model, positive, negative, cfg, residency="auto", rank=0, mode="npo",
                autoguidance_scale=1.0, start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        guider = SelfNPOGuider(model, negative_model, **_guidance_options(
            residency, rank, mode, autoguidance_scale, start_percent, end_percent))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class SelfNPOApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelfNPOApply",
            display_name="Apply Self-NPO",
            category="sampling/self_npo",
            description="Makes every sampler node (KSampler, ...) guide with the Self-NPO negative model "
                        "(mode npo: the negative prompt is evaluated on it). Pre-CFG and post-CFG patches keep working.",
            search_aliases=SEARCH_ALIASES,
            inputs=[io.Model.Input("model", tooltip=_MODEL_TOOLTIP),
                    io.Model.Input("negative_model", tooltip=_NEGATIVE_MODEL_TOOLTIP), *_inputs()],
            outputs=[io.Model.Output(tooltip="The model, guiding with the negative model in every sampler node "
                                             "(KSampler, SamplerCustom, ...). Apply Self-NPO after your LoRA "
                                             "loaders.")],
        )

    @classmethod
    def execute(cls, model, negative_model, residency="auto", rank=0, mode="npo", autoguidance_scale=1.0,
                start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        return io.NodeOutput(apply_self_npo(model, negative_model, **_guidance_options(
            residency, rank, mode, autoguidance_scale, start_percent, end_percent)))


NODES = [SelfNPOCFGGuider, SelfNPOApply]
