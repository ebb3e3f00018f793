"""'Self-NPO Train (TDFT)': trains the negative model inside ComfyUI and outputs it as a MODEL.

A thin front end over `training.session.TrainingSession` (the same run the CLI makes). The weights
go to the `self_npo` models folder, so 'Self-NPO Negative Model' lists them at once; the resumable
checkpoint, loss log and previews go to `<output>/self_npo_training/<name>/` (kept out of the models
folder so the loader never lists checkpoints). Running again with the same name does what
`on_existing_run` says: continue that checkpoint (or refuse, naming every setting that differs),
start over with the earlier run's files moved aside, or continue with changed data.

The preset's values travel with the node definition (`extra_dict` of the preset combo); the pack's
frontend extension (web/selfnpo_train_presets.js) shows them in steps / learning_rate / lora_rank /
teacher when a preset is picked. 0 (and teacher "preset") still means "the preset's value", so
workflows saved before keep working. A preset is a memory preset: the method's recipe (corruption
guidance, unconditional input, resolution, learning rate) comes from the connected model's family
(training/recipes.py); the resolution and corruption_guidance widgets override it (0 = the recipe's),
and the node shows the resolved recipe before training starts.
"""
from __future__ import annotations

import logging
from pathlib import Path

from comfy_api.latest import io, ui

from ..training.config import DEFAULT_PRESET, PRESETS, TDFTConfig, choices_of, describe
from ..training.recipes import LORA_LEARNING_RATE

log = logging.getLogger("comfy_selfnpo")

TEACHER_CHOICES = ["preset", *choices_of("teacher")]  # "preset": the preset's teacher
RUNS_SUBFOLDER = "self_npo_training"
PRESET_WIDGETS = ("steps", "learning_rate", "lora_rank", "teacher")  # what a preset fills in on the node
# What running again under the same name does with the earlier run: SessionOptions for each choice.
ON_EXISTING_RUN = {
    "continue": dict(resume=True),
    "start_over": dict(resume=False, start_over=True),
    "continue_with_changed_data": dict(resume=True, allow_data_change=True),
}


def preset_widget_values() -> dict[str, dict]:
    """Per preset: the values the node's widgets show for it (the preset's, else the TDFT default;
    0 where the model family's recipe decides, e.g. the learning rate)."""
    defaults = TDFTConfig()

    def shown(values, widget):
        value = values.get(widget, getattr(defaults, widget))
        if widget == "learning_rate" and value is None and values.get("mode") == "lora":
            return LORA_LEARNING_RATE  # a LoRA's rate is the same for every family
        return 0 if value is None else value
    return {name: {w: shown(values, w) for w in PRESET_WIDGETS} for name, values in PRESETS.items()}


def input_subfolders() -> list[str]:
    """"" (data-free) and every folder under ComfyUI's input/ (two levels), for the data picker."""
    import folder_paths

    root = Path(folder_paths.get_input_directory())
    found = [p.relative_to(root).as_posix() for p in sorted(root.glob("*")) + sorted(root.glob("*/*")) if p.is_dir()]
    return [""] + sorted(found)


def run_paths(name: str):
    """(RunPaths, name) for an output name: weights in the self_npo models folder, run files in the
    output folder."""
    import folder_paths

    from ..model_folders import self_npo_output_dir
    from ..training.run_files import RunPaths
    from ..training.session import check_run_name

    name = check_run_name(name)
    run_dir = Path(folder_paths.get_output_directory()) / RUNS_SUBFOLDER / name
    return RunPaths(run_dir=run_dir, weights=Path(self_npo_output_dir()) / f"{name}.safetensors"), name


def collect_overrides(steps, learning_rate, lora_rank, teacher, seed, save_every, overrides_text, resolution=0,
                      corruption_guidance=0.0) -> dict:
    """The node's knobs over the preset and the model family's recipe: 0 / "preset" keep the preset's
    (or the recipe's) value; the overrides text (key = value lines) wins over everything."""
    from ..training.settings import parse_overrides

    values = {"seed": seed, "save_every": save_every}
    if resolution:
        values["resolution"] = resolution
    if corruption_guidance:
        values["corruption_guidance"] = corruption_guidance
    if steps:
        values["steps"] = steps
    if learning_rate:
        values["learning_rate"] = learning_rate
    if lora_rank:
        values["lora_rank"] = lora_rank
    if teacher and teacher != "preset":
        values["teacher"] = teacher
    values.update(parse_overrides(overrides_text))
    return values


def data_source(input_folder: str, data_folder: str, prompts: str, config):
    """The training data: a folder under input/ or any path (not both), else the prompts (prompt-only),
    else the pack's default prompt list."""
    import folder_paths

    from ..training.data import ImageCaptionFolder, PromptList, default_prompts

    input_folder, data_folder = (input_folder or "").strip(), (data_folder or "").strip()
    if input_folder and data_folder:
        raise ValueError("Self-NPO Train: give the data as input_folder or as data_folder, not both")
    if input_folder:
        data_folder = str(Path(folder_paths.get_input_directory()) / input_folder)
    if data_folder:
        return ImageCaptionFolder(data_folder, config.resolution)
    if not (prompts or "").strip():
        return default_prompts()
    return PromptList((prompts or "").splitlines())


_PRESET_HELP = ("A memory preset: how the run fits a GPU. sd15/sdxl: the authors' published full fine-tuning runs "
                "(8-bit AdamW, their batch); lora-*: a LoRA sized for 8/12/16/24 GB GPUs (attention layers and "
                "precision chosen per model family). The method's recipe (corruption guidance, unconditional input, "
                "resolution, learning rate) always comes from the connected model's family. Picking a preset fills "
                "in steps, learning_rate, lora_rank and teacher.")
_AUTO = " 0 = the model family's recipe (shown before training starts)."


def _inputs() -> list:
    from ..training.data import default_prompts

    preset_value = "; picking a preset fills in its value (0 or 'preset' = the preset's)."
    return [
        io.Model.Input("model", tooltip="The model to train the negative of (never changed in place)."),
        io.Clip.Input("clip", tooltip="Its text encoder (encodes captions and prompts)."),
        io.String.Input("data_folder", default="",
                        tooltip="Training data anywhere on disk (a path; or pick a folder of ComfyUI's input/ with "
                                "input_folder): images (video models: also clips) with same-name .txt captions, "
                                "kohya layout ('10_name' sub-folders repeat 10 times). Empty: prompt-only (this "
                                "pack's extension) from the prompts below."),
        io.String.Input("prompts", default="a photo of a cat\na landscape painting\na portrait of a person",
                        multiline=True, tooltip=f"Prompt-only mode (no data folder; this pack's extension: the authors "
                                                "start every rollout from real images): one prompt per line. Empty: "
                                                f"the pack's default list of {len(default_prompts())} prompts. A few hundred "
                                                "varied prompts (or images) cover what the model makes."),
        io.Combo.Input("preset", options=list(PRESETS), default=DEFAULT_PRESET, tooltip=_PRESET_HELP,
                       extra_dict={"selfnpo_presets": preset_widget_values()}),
        io.Int.Input("steps", default=0, min=0, max=1_000_000, tooltip=describe("steps") + preset_value),
        io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-7, round=False, advanced=True,
                       tooltip=describe("learning_rate") + preset_value),
        io.Int.Input("lora_rank", default=0, min=0, max=1024, advanced=True,
                     tooltip=describe("lora_rank") + " (LoRA presets)" + preset_value),
        io.Combo.Input("teacher", options=TEACHER_CHOICES, default="preset", advanced=True,
                       tooltip=describe("teacher") + preset_value),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False, tooltip=describe("seed")),
        io.String.Input("output_name", default="self_npo_negative",
                        tooltip="File name in models/self_npo (no extension). Running again with the same name "
                                "resumes that run (see on_existing_run)."),
        io.Int.Input("save_every", default=TDFTConfig().save_every, min=0, max=1_000_000, advanced=True,
                     tooltip=describe("save_every") + "; step files go to models/self_npo."),
        io.Int.Input("preview_every", default=0, min=0, max=1_000_000, advanced=True,
                     tooltip="Every N steps, show the first prompt sampled with plain CFG and with NPO-CFG in the "
                             "node's progress preview (0 = never)."),
        io.String.Input("overrides", default="", multiline=True, optional=True, advanced=True,
                        tooltip="Any other TDFT hyper-parameter as `key = value` lines, e.g. batch_size = 2, "
                                "resolution = 768, frames = 17, corruption_guidance = -1, mixed_precision = bf16."),
        io.Vae.Input("vae", optional=True, tooltip="Needed for image or clip data (encodes them) and for decoded "
                                                   "previews."),
        io.Combo.Input("input_folder", options=input_subfolders(), default="", optional=True,
                       tooltip="Training data picked from the folders of ComfyUI's input/ (instead of a "
                               "data_folder path); empty: none."),
        # last, so workflows saved before keep their widget values in place
        io.Int.Input("resolution", default=0, min=0, max=4096, step=8, optional=True,
                     tooltip=describe("resolution") + "." + _AUTO),
        io.Float.Input("corruption_guidance", default=0.0, min=-20.0, max=20.0, step=0.5, optional=True,
                       tooltip=describe("corruption_guidance") + "." + _AUTO),
        io.Combo.Input("on_existing_run", options=list(ON_EXISTING_RUN), default="continue", optional=True,
                       tooltip="When a run of this name exists: continue it (changed steps, learning rate or "
                               "save cadence apply from its last step; other changed settings are refused, "
                               "naming them); start_over (its files are moved to <name>-old-<date-time>, "
                               "nothing is deleted); or continue_with_changed_data (continue although the "
                               "images, captions or prompts changed)."),
    ]


def _outputs() -> list:
    return [
        io.Model.Output(display_name="negative_model",
                        tooltip="The trained negative model, for 'Self-NPO CFG Guider' / 'Apply Self-NPO'."),
        io.String.Output(display_name="weights_path", tooltip="The saved weights file (in models/self_npo)."),
        io.Image.Output(display_name="loss_curve", tooltip="The loss curve of the run (also shown on the node)."),
        io.LoraModel.Output(display_name="lora", tooltip="LoRA runs: the trained LoRA as core's LORA_MODEL (for "
                                                         "'Load LoRA Model' / 'Save LoRA Weights'); empty for full "
                                                         "fine-tuning (GBs: its offset is in weights_path)."),
        io.LossMap.Output(display_name="loss_map", tooltip="The loss of every step as core's LOSS_MAP (for 'Plot "
                                                           "Loss Graph')."),
    ]


class NodeProgress:
    """ComfyUI's progress bar and cancel button for a run: steps, previews and the one-time data
    preparation report into the bar; a cancel ends the run at the next step (after a checkpoint)."""

    def __init__(self, total: int):
        import comfy.model_management as mm
        import comfy.utils

        self.mm, self.total, self.cancelled = mm, total, False
        self.bar = comfy.utils.ProgressBar(total)

    def should_stop(self) -> bool:
        # not the raising check: the trainer must save its checkpoint before the interrupt goes up
        return self.cancelled or self.mm.processing_interrupted()

    def _report(self, update) -> None:
        # the server's progress hook raises InterruptProcessingException on cancel: remember it and let
        # should_stop() end the run cleanly at the step boundary
        try:
            update()
        except self.mm.InterruptProcessingException:
            self.cancelled = True

    def step(self, progress) -> None:
        self._report(lambda: self.bar.update_absolute(progress.step, progress.total))

    def preview(self, image, step: int) -> None:
        self._report(lambda: self.bar.update_absolute(step, self.total, ("PNG", image, 512)))

    def prepare(self, done: int, total: int) -> None:
        self._report(lambda: self.bar.update_absolute(done, total))


class SelfNPOTrainTDFT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelfNPOTrainTDFT",
            display_name="Self-NPO Train (TDFT)",
            category="training/self_npo",
            search_aliases=["NPO", "Self-NPO", "Diffusion-NPO", "negative LoRA", "train negative model", "TDFT",
                            "autoguidance", "negative preference"],
            description="Trains the Self-NPO negative model with truncated diffusion fine-tuning (TDFT): the "
                        "model is fine-tuned on its own corrupted generations (K teacher steps per sample). "
                        "Saves to models/self_npo; rerunning with the same name resumes. Cancel saves a "
                        "resumable checkpoint.",
            is_output_node=True,
            inputs=_inputs(),
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, data_folder, prompts, preset, steps, learning_rate, lora_rank, teacher, seed,
                output_name, save_every, preview_every, overrides="", vae=None, input_folder="",
                on_existing_run="continue", resolution=0, corruption_guidance=0.0) -> io.NodeOutput:
        from ..training.recipes import resolve_for_model
        from ..training.settings import build_config

        paths, name = run_paths(output_name)
        try:
            config = resolve_for_model(build_config(preset, collect_overrides(
                steps, learning_rate, lora_rank, teacher, seed, save_every, overrides or "", resolution,
                corruption_guidance)), model)
        except ValueError as e:
            raise ValueError(f"Self-NPO Train: {e}") from None
        data = data_source(input_folder, data_folder, prompts, config)
        trainer, result = _train(model, clip, vae, data, config, paths, name, preview_every, seed, on_existing_run)
        _refresh_loader_list()
        return _outputs_of(trainer, result)


def _train(model, clip, vae, data, config, paths, name, preview_every, seed, on_existing_run):
    import comfy.model_management as mm

    from ..training.errors import OutOfMemory, ResumeMismatch, TrainingCancelled
    from ..training.session import SessionOptions, TrainingSession

    progress = NodeProgress(config.steps)
    recipe, plan = recipe_text(model, config), plan_report(model, clip, vae, config)
    show_before_training("\n".join(text for text in (recipe, plan) if text))
    options = SessionOptions(**ON_EXISTING_RUN[on_existing_run], preview_every=preview_every, preview_seed=seed,
                             on_step=progress.step, on_preview=progress.preview, should_stop=progress.should_stop,
                             on_prepare=progress.prepare, extra_summary={"node": "SelfNPOTrainTDFT", "name": name,
                                                                         "recipe": recipe, "plan": plan})
    session = TrainingSession(model, clip, vae, data, config, paths, options)
    try:
        trainer = session.prepare()
        progress.bar.update_absolute(trainer.step, config.steps)
        return trainer, session.run()
    except TrainingCancelled as e:
        log.warning("Self-NPO Train: %s", e)
        mm.interrupt_current_processing(False)
        raise mm.InterruptProcessingException() from e
    except OutOfMemory as e:
        raise RuntimeError(f"Self-NPO Train: {e}") from e
    except ResumeMismatch as e:
        raise ResumeMismatch(f"Self-NPO Train: {e}. {_MISMATCH_HINT[e.data_only]}", e.differences, e.data_only) from None
    finally:
        session.close()
        mm.soft_empty_cache()


_MISMATCH_HINT = {  # by ResumeMismatch.data_only
    False: "To train with these settings from scratch, set on_existing_run to start_over (the earlier run's "
           "files are moved to <name>-old-<date-time>, nothing is deleted) or choose another output_name",
    True: "If the new data is intended, set on_existing_run to continue_with_changed_data; to train on it from "
          "scratch, set it to start_over (the earlier run's files are moved aside, nothing is deleted)",
}


def recipe_text(model, config) -> str:
    from ..training.families import family_of
    from ..training.recipes import describe_recipe

    return describe_recipe(config, family_of(model.model))


def show_before_training(text: str) -> None:
    """The resolved recipe and the memory plan, before training starts: in the log and as the node's
    progress text."""
    log.info("Self-NPO Train: %s", text)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer

        context = get_executing_context()
        if context is not None and getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_progress_text(text, context.node_id)
    except (ImportError, AttributeError):  # headless use or an older ComfyUI: the log has it
        pass

def plan_report(model, clip, vae, config) -> str:
    """The planner's prediction for this run (peak GPU memory, TFLOP per step, which cards it fits),
    logged before training starts; "" when the planner cannot trace the model (training goes on)."""
    from ..training.planner import format_plan, plan_for_model

    try:
        text = format_plan(plan_for_model(model, clip, vae, config, both_checkpointing=False))
    except Exception as e:  # a prediction must never stop a run
        log.warning("Self-NPO Train: no memory plan for this model (%s: %s)", type(e).__name__, e)
        return ""
    return text


def run_report(result) -> str:
    """What the node shows under its outputs when the run is done."""
    s = result.summary
    loss = f"{s['final_loss']:.4g}" if s.get("final_loss") is not None else "-"
    resumed = f", resumed from step {s['resumed_from_step']}" if s.get("resumed_from_step") is not None else ""
    recipe = f"{s['recipe']}\n" if s.get("recipe") else ""
    return (f"{recipe}{s['step']}/{s['steps']} steps{resumed} in {s['seconds']:.0f} s, final loss {loss}\n"
            f"weights: {Path(result.weights).name} (models/self_npo)\nrun files: {Path(s['paths']['loss_csv']).parent}")


def _outputs_of(trainer, result) -> io.NodeOutput:
    from ..training.run_files import image_to_tensor

    curve = image_to_tensor(result.loss_image)
    shown = {**ui.PreviewImage(curve).as_dict(), **ui.PreviewText(run_report(result)).as_dict()}
    return io.NodeOutput(trainer.negative_model(), str(result.weights), curve, trainer.trained.lora_model(),
                         {"loss": [float(r["loss"]) for r in result.loss_rows]}, ui=shown)


def _refresh_loader_list() -> None:
    """ComfyUI caches folder listings; drop the self_npo entry so the loader lists the new file."""
    import folder_paths

    folder_paths.filename_list_cache.pop("self_npo", None)


NODES = [SelfNPOTrainTDFT]
