"""'Self-NPO Negative Model': the positive MODEL plus NPO weights, θ_neg = θ_pos + η·δ − β·(θ_pos − θ_base)."""
from __future__ import annotations

import os

from comfy_api.latest import io

from ..model_folders import SELF_NPO_FOLDER, list_model_files, register_self_npo_folder
from ..npo.weights import load_npo_file, make_negative_model

# Where the loader looks, in this order. Each choice is shown as "<folder>/<file name>" so it is never
# ambiguous which folder a file comes from.
SOURCE_FOLDERS = (SELF_NPO_FOLDER, "loras", "diffusion_models")


def list_npo_files() -> list[str]:
    import folder_paths

    register_self_npo_folder()
    choices = []
    for folder in SOURCE_FOLDERS:
        if folder not in folder_paths.folder_names_and_paths:
            continue
        choices += [f"{folder}/{name}" for name in list_model_files(folder)]
    return choices


def resolve_npo_choice(choice: str) -> str:
    """"loras/sub/x.safetensors" -> full path; a clear error for anything else."""
    import folder_paths

    folder, _, name = choice.partition("/")
    if folder not in SOURCE_FOLDERS or not name:
        raise ValueError(f"'{choice}' is not a Self-NPO weight choice: expected one of the folders "
                         f"{', '.join(SOURCE_FOLDERS)} followed by '/' and a file name")
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise FileNotFoundError(f"Self-NPO weight file '{name}' was not found in the '{folder}' models folder(s): "
                                f"{folder_paths.get_folder_paths(folder)}")
    return path


class SelfNPONegativeModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelfNPONegativeModelLoader",
            display_name="Self-NPO Negative Model",
            category="sampling/self_npo",
            description="Builds the Self-NPO negative model: the positive model (with all its LoRAs) plus "
                        "the NPO weights. Connect it to 'Self-NPO CFG Guider' or 'Apply Self-NPO'.",
            inputs=[
                io.Model.Input("model", tooltip="The positive model; the negative inherits all its patches."),
                io.Combo.Input("npo_weights", options=list_npo_files(),
                               tooltip="NPO weights: a LoRA (kohya, PEFT or diffusers names, e.g. the authors' "
                                       "Diffusion-NPO releases), an offset (.diff) or a whole diffusion model "
                                       "(UNet or DiT, ComfyUI or diffusers keys). Damaged files (NaN/inf, "
                                       "LoRA ranks that disagree) are refused. Listed from the self_npo, loras "
                                       "and diffusion_models folders."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="η: scale of the NPO offset (1.0: as trained; 0 is refused, it would "
                                       "make the guidance plain CFG)."),
                io.Float.Input("merge_weight", default=0.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="β: pulls the negative towards the base model, "
                                       "θ_neg = θ_pos + η·δ − β·(θ_pos − θ_base). Needs base_model when ≠ 0."),
                io.Model.Input("base_model", optional=True,
                               tooltip="θ_base: the model the NPO weights were trained from (needed for a "
                                       "merge weight ≠ 0; whole-model files become an offset against it, else "
                                       "against the positive model: the report says which, and warns when the "
                                       "file names another base)."),
            ],
            outputs=[io.Model.Output(display_name="negative_model",
                                     tooltip="The negative model, for 'Apply Self-NPO' / 'Self-NPO CFG Guider' (not "
                                             "for sampling on its own: it shares its weights with the model)."),
                     io.String.Output(display_name="report",
                                      tooltip="What the file held and what was patched (format, weights, unmatched "
                                              "keys).")],
        )

    @classmethod
    def fingerprint_inputs(cls, npo_weights=None, **_inputs):
        """The chosen file as it is on disk: a file overwritten under the same name is read again,
        instead of ComfyUI reusing the negative model it cached for that name."""
        try:
            path = resolve_npo_choice(npo_weights)
            stat = os.stat(path)
        except (ValueError, OSError, TypeError):
            return npo_weights  # the run reports what is wrong with the choice
        return f"{os.path.realpath(path)}|{stat.st_mtime_ns}|{stat.st_size}"

    @classmethod
    def execute(cls, model, npo_weights, strength, merge_weight, base_model=None) -> io.NodeOutput:
        npo = load_npo_file(resolve_npo_choice(npo_weights))
        negative, report = make_negative_model(model, npo, strength=strength, merge_weight=merge_weight,
                                               base=base_model)
        return io.NodeOutput(negative, report.summary())


NODES = [SelfNPONegativeModelLoader]
