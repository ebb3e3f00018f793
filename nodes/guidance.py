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
    "steers away from what the negative model makes of your negative prompt. Use it as you use plain CFG.\n"
    "autoguidance: the negative model runs on your positive prompt (autoguidance, Karras et al. 2024: guidance "
    "away from a weaker version of the same model); the negative prompt has no effect and cfg scales the "
    "distance from the negative model. For guidance without a negative prompt.\n"
    "cfg+autoguidance: plain CFG with your negative prompt on the positive model, plus an autoguidance term with "
    "its own scale (autoguidance_scale). Keeps your negative prompt working and adds Self-NPO on top; the only "
    "mode that acts at cfg 1 (e.g. guidance-distilled models). Costs a third prediction per step.")
_AG_SCALE_TOOLTIP = ("cfg+autoguidance only: weight of the autoguidance term (positive model − negative model, "
                     "both on the positive prompt). 0 gives plain CFG.")
_START_TOOLTIP = ("Where in sampling Self-NPO starts to act, as a fraction of the model's noise schedule (0 = pure "
                  "noise, 1 = the end), as in ComfyUI's ControlNet and conditioning ranges. Steps outside "
                  "start–end are plain CFG on the positive model and cost nothing extra.")
_END_TOOLTIP = "Where in sampling Self-NPO stops acting (1 = the end of the noise schedule). See start_percent."


def _inputs():
    # optional with defaults: workflows saved before these inputs existed still load and validate
    return [
        io.Combo.Input("residency", options=list(RESIDENCIES), default="auto", tooltip=_RESIDENCY_TOOLTIP),
        io.Int.Input("rank", default=0, min=0, max=4096, tooltip=_RANK_TOOLTIP),
        io.Combo.Input("mode", options=list(MODES), default="npo", optional=True, tooltip=_MODE_TOOLTIP),
        io.Float.Input("autoguidance_scale", default=1.0, min=0.0, max=100.0, step=0.05, round=0.01,
                       optional=True, tooltip=_AG_SCALE_TOOLTIP),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True,
                       tooltip=_START_TOOLTIP),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip=_END_TOOLTIP),
    ]


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
            description="CFG whose negative branch runs on the Self-NPO negative model (for SamplerCustomAdvanced).",
            inputs=[
                io.Model.Input("model"),
                io.Model.Input("negative_model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01),
                *_inputs(),
            ],
            outputs=[io.Guider.Output()],
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
            inputs=[io.Model.Input("model"), io.Model.Input("negative_model"), *_inputs()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, negative_model, residency="auto", rank=0, mode="npo", autoguidance_scale=1.0,
                start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        return io.NodeOutput(apply_self_npo(model, negative_model, **_guidance_options(
            residency, rank, mode, autoguidance_scale, start_percent, end_percent)))


NODES = [SelfNPOCFGGuider, SelfNPOApply]
