"""'Self-NPO CFG Guider' (GUIDER) and 'Apply Self-NPO' (MODEL -> MODEL)."""
from __future__ import annotations

from comfy_api.latest import io

from ..npo.guidance import RESIDENCIES, SelfNPOGuider, apply_self_npo

_RESIDENCY_TOOLTIP = ("How the negative model's weights are held. separate: its own copy (+1 model of memory). "
                      "batched_lowrank: one copy of the weights, the NPO change applied to the unconditional "
                      "rows of the batch (as fast as plain CFG). auto: batched for LoRA-type changes, else separate.")
_RANK_TOOLTIP = ("batched_lowrank only: full-rank offsets are reduced by SVD to this rank (the relative error is "
                 "logged). 0 keeps them exact.")


def _inputs():
    return [
        io.Combo.Input("residency", options=list(RESIDENCIES), default="auto", tooltip=_RESIDENCY_TOOLTIP),
        io.Int.Input("rank", default=0, min=0, max=4096, tooltip=_RANK_TOOLTIP),
    ]


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
    def execute(cls, model, negative_model, positive, negative, cfg, residency="auto", rank=0) -> io.NodeOutput:
        guider = SelfNPOGuider(model, negative_model, residency=residency, rank=rank or None)
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
            description="Makes every sampler node (KSampler, ...) evaluate the negative prompt on the Self-NPO "
                        "negative model. Pre-CFG and post-CFG patches keep working.",
            inputs=[io.Model.Input("model"), io.Model.Input("negative_model"), *_inputs()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, negative_model, residency="auto", rank=0) -> io.NodeOutput:
        return io.NodeOutput(apply_self_npo(model, negative_model, residency=residency, rank=rank or None))


NODES = [SelfNPOCFGGuider, SelfNPOApply]
