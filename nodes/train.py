"""'Self-NPO Train (TDFT)': trains the negative model inside ComfyUI and outputs it as a MODEL.

A thin front end over `training.session.TrainingSession` (the same run the CLI makes). The weights
go to the `self_npo` models folder, so 'Self-NPO Negative Model' lists them at once; the resumable
checkpoint, loss log and previews go to `<output>/self_npo_training/<name>/` (kept out of the models
folder so the loader never lists checkpoints). Running again with the same name resumes that
checkpoint (or refuses, naming the hyper-parameters that differ).
"""
from __future__ import annotations

import logging
from pathlib import Path

from comfy_api.latest import io

from ..training.config import PRESETS, describe

log = logging.getLogger("comfy_selfnpo")

TEACHER_CHOICES = ["preset", "ema", "base"]
RUNS_SUBFOLDER = "self_npo_training"


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


def collect_overrides(steps, learning_rate, lora_rank, teacher, seed, save_every, overrides_text) -> dict:
    """The node's knobs over the preset: 0 / "preset" keep the preset's value; the overrides text
    (key = value lines) wins over everything."""
    from ..training.settings import parse_overrides

    values = {"seed": seed, "save_every": save_every}
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


class SelfNPOTrainTDFT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelfNPOTrainTDFT",
            display_name="Self-NPO Train (TDFT)",
            category="training/self_npo",
            description="Trains the Self-NPO negative model with truncated diffusion fine-tuning (TDFT): the "
                        "model is fine-tuned on its own corrupted generations (K teacher steps per sample). "
                        "Saves to models/self_npo; rerunning with the same name resumes. Cancel saves a "
                        "resumable checkpoint.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to train the negative of (never changed in place)."),
                io.Clip.Input("clip", tooltip="Its text encoder (encodes captions/prompts)."),
                io.String.Input("data_folder", default="",
                                tooltip="Folder of images with same-name .txt captions (kohya layout). Leave "
                                        "empty to train data-free from the prompts below."),
                io.String.Input("prompts", default="a photo of a cat\na landscape painting\na portrait of a person",
                                multiline=True,
                                tooltip="Data-free mode (used when data_folder is empty): one prompt per line."),
                io.Combo.Input("preset", options=list(PRESETS), default="lora-12gb",
                               tooltip="sd15/sdxl: the authors' published full fine-tuning recipes; lora-*: "
                                       "LoRA sized for 8/12/16/24 GB GPUs (frozen base as teacher)."),
                io.Int.Input("steps", default=0, min=0, max=1_000_000,
                             tooltip=f"{describe('steps')}; 0 = the preset's."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-7, round=False,
                               tooltip=f"{describe('learning_rate')}; 0 = the preset's."),
                io.Int.Input("lora_rank", default=0, min=0, max=1024,
                             tooltip=f"{describe('lora_rank')}; LoRA presets only; 0 = the preset's."),
                io.Combo.Input("teacher", options=TEACHER_CHOICES, default="preset",
                               tooltip=f"{describe('teacher')}; preset = the preset's."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip=describe("seed")),
                io.String.Input("output_name", default="self_npo_negative",
                                tooltip="File name in models/self_npo (no extension). The same name resumes."),
                io.Int.Input("save_every", default=100, min=0, max=1_000_000,
                             tooltip=describe("save_every") + "; step files go to models/self_npo."),
                io.Int.Input("preview_every", default=0, min=0, max=1_000_000,
                             tooltip="Every N steps, show the first prompt sampled with plain CFG and with "
                                     "NPO-CFG in the progress preview (0 = never)."),
                io.String.Input("overrides", default="", multiline=True, optional=True,
                                tooltip="Any other TDFT hyper-parameter as `key = value` lines, e.g. "
                                        "batch_size = 2, resolution = 768, truncation_steps = 5, "
                                        "corruption_guidance = -1, mixed_precision = bf16."),
                io.Vae.Input("vae", optional=True, tooltip="Needed for image data (encodes the images) and "
                                                           "for decoded previews."),
            ],
            outputs=[
                io.Model.Output(display_name="negative_model",
                                tooltip="The trained negative model, for 'Self-NPO CFG Guider' / 'Apply Self-NPO'."),
                io.String.Output(display_name="weights_path", tooltip="The saved weights file."),
                io.Image.Output(display_name="loss_curve"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, data_folder, prompts, preset, steps, learning_rate, lora_rank, teacher,
                seed, output_name, save_every, preview_every, overrides="", vae=None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..training.data import ImageCaptionFolder, PromptList
        from ..training.errors import OutOfMemory, TrainingCancelled
        from ..training.run_files import image_to_tensor
        from ..training.session import SessionOptions, TrainingSession
        from ..training.settings import build_config

        paths, name = run_paths(output_name)
        try:
            config = build_config(preset, collect_overrides(steps, learning_rate, lora_rank, teacher, seed,
                                                            save_every, overrides or ""))
        except ValueError as e:
            raise ValueError(f"Self-NPO Train: {e}") from None
        if data_folder and data_folder.strip():
            data = ImageCaptionFolder(data_folder.strip(), config.resolution)
        else:
            data = PromptList((prompts or "").splitlines())

        cancelled = {"flag": False}
        pbar = comfy.utils.ProgressBar(config.steps)

        def should_stop() -> bool:
            # Not the raising check: the trainer must save its checkpoint before the interrupt goes up.
            return cancelled["flag"] or mm.processing_interrupted()

        def report(update):
            # The server's progress hook raises InterruptProcessingException on cancel; remember it and
            # let should_stop() end the run cleanly at the step boundary.
            try:
                update()
            except mm.InterruptProcessingException:
                cancelled["flag"] = True

        def on_step(progress):
            report(lambda: pbar.update_absolute(progress.step, progress.total))

        def on_preview(image, step):
            report(lambda: pbar.update_absolute(step, config.steps, ("PNG", image, 512)))

        def on_prepare(done, total):  # the data-free buffer's pre-roll: its own progress, cancellable
            report(lambda: pbar.update_absolute(done, total))

        options = SessionOptions(resume=True, preview_every=preview_every, preview_seed=seed,
                                 on_step=on_step, on_preview=on_preview, should_stop=should_stop,
                                 on_prepare=on_prepare, extra_summary={"node": "SelfNPOTrainTDFT", "name": name})
        session = TrainingSession(model, clip, vae, data, config, paths, options)
        try:
            trainer = session.prepare()
            pbar.update_absolute(trainer.step, config.steps)
            result = session.run()
        except TrainingCancelled as e:
            log.warning("Self-NPO Train: %s", e)
            mm.interrupt_current_processing(False)
            raise mm.InterruptProcessingException() from e
        except OutOfMemory as e:
            raise RuntimeError(f"Self-NPO Train: {e}") from e
        finally:
            session.close()
            mm.soft_empty_cache()
        _refresh_loader_list()
        return io.NodeOutput(trainer.negative_model(), str(result.weights), image_to_tensor(result.loss_image))


def _refresh_loader_list() -> None:
    """ComfyUI caches folder listings; drop the self_npo entry so the loader lists the new file."""
    import folder_paths

    folder_paths.filename_list_cache.pop("self_npo", None)


NODES = [SelfNPOTrainTDFT]
