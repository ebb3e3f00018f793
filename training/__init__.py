"""TDFT training core (no node code). Names are imported lazily so that importing the package (and
the CLI's argument parser) does not import torch or ComfyUI."""
from __future__ import annotations

_EXPORTS = {
    "TDFTConfig": ".config", "PRESETS": ".config", "make_config": ".config",
    "ImageCaptionFolder": ".data", "PromptList": ".data", "read_prompts_file": ".data",
    "TDFTTrainer": ".trainer", "StepResult": ".trainer", "TrainResult": ".trainer",
    "base_model_hash": ".trainer",
    "TrainingError": ".errors", "DataError": ".errors", "NonFiniteLoss": ".errors",
    "ResumeMismatch": ".errors", "UnsupportedModel": ".errors", "TrainingCancelled": ".errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
