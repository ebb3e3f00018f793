"""Small shared helpers of the TDFT tests (data folders, snapshots)."""
from __future__ import annotations

from pathlib import Path

import torch


def make_image_folder(folder: Path, count: int = 3, size=(64, 72), captions=True, seed=0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    words = ["a red cube", "a blue ball on grass", "a small house", "a dog", "a tree at night"]
    for i in range(count):
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(words[i % len(words)])
    return folder


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def base_prediction(model_patcher, x, sigma, cond: dict):
    """The MODEL's x0-prediction for one prompt's inputs (`trainer.to_model_cond`) on every row of x."""
    import comfy.model_management

    from comfy_selfnpo.training.conditioning import ROW_CONSTANTS

    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    with torch.no_grad():
        s = torch.full((x.shape[0],), float(sigma))
        constants = (cond.get(ROW_CONSTANTS) or [{}])[0]
        c = {k: v.expand(x.shape[0], *v.shape[1:]) for k, v in cond.items() if k != ROW_CONSTANTS}
        return model_patcher.model.apply_model(x, s, **constants, **c).float()


