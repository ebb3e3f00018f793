"""TDFT training core (no node code), shared by the training node, the CLI and the tests.

    from comfy_selfnpo.training import ImageCaptionFolder, TDFTTrainer, make_config
    config = make_config("lora-12gb", steps=500)   # a memory preset; w, resolution, ...: the model family's recipe
    trainer = TDFTTrainer(model, clip, vae, ImageCaptionFolder("data/", 512), config, "runs/npo")
    trainer.train(on_step=print, should_stop=lambda: False)            # resumable: load_checkpoint()
    trainer.export("npo_lora.safetensors")                             # LoRA / offset / UNet file
    negative = trainer.negative_model()                                # MODEL for the guider nodes

Modules: config (TDFTConfig: every hyper-parameter with its meaning, the memory PRESETS), recipes (the
method's recipe per family, `resolve`), families (the registry: one row per model family), settings
(front-end parsing, --print-config's TOML), data (image folder, latents, prompts), encoding (data -> latents and conditioning, once),
tdft (the step math in ComfyUI terms, `tdft_step`), draws (per-item random draws), trained (full
weights or an adapter, with the teacher), adapters (ComfyUI's own LoRA, LoHa, LoKr on the loaded
model), grad_checkpointing, starts / trajectories (real latents or the prompt-only trajectory buffer),
optimization (AdamW, schedule, precision), distributed (torchrun), checkpoint (the resumable checkpoint
format), identity (base-model hash), export (weight files, the negative MODEL), atomic_files, trainer
(TDFTTrainer), session / run_files (a whole run and its files), errors. Names are imported lazily so
that importing the package (and the CLI's argument parser) does not import torch or ComfyUI."""
from __future__ import annotations

_EXPORTS = {
    "TDFTConfig": ".config", "PRESETS": ".config", "make_config": ".config",
    "resolve": ".recipes", "resolve_for_model": ".recipes", "default_prompts": ".data",
    "ImageCaptionFolder": ".data", "LatentDataset": ".data", "PromptList": ".data", "read_prompts_file": ".data",
    "TDFTTrainer": ".trainer", "StepResult": ".trainer", "TrainResult": ".trainer",
    "model_identity": ".identity", "OutOfMemory": ".errors", "LocalWorld": ".distributed",
    "world_from_environment": ".distributed",
    "TrainingError": ".errors", "DataError": ".errors", "NonFiniteLoss": ".errors",
    "ResumeMismatch": ".errors", "UnsupportedModel": ".errors", "TrainingCancelled": ".errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
