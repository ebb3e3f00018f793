"""What a run trains (`mode`), one row each: the class of trained.py that implements it.

torch-free (trained.py is not: its classes use torch at import): the config and the CLI's argument
parser read the names as the `mode` choices, so a new kind is its class in trained.py and a row here.
"""
from __future__ import annotations

TRAINED_KINDS = {
    "full": "FullWeights",  # every weight of the model (the paper)
    "lora": "LoRAWeights",  # an adapter of ComfyUI's own on the frozen model (this pack's extension)
}
