"""Training data: a kohya-style image folder with captions, or a list of prompts (data-free mode).

These classes only find, check and read the data; encoding with the loaded VAE/CLIP happens once in
the trainer (and is cached there), so this module has no model code and no ComfyUI dependency.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

log = logging.getLogger("comfy_selfnpo.training")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str


def center_crop_resize(image, resolution: int) -> torch.Tensor:
    """Aspect-aware crop as the authors' data pipeline does it (Resize(res) then CenterCrop(res)):
    scale so the *shorter* side equals `resolution` (no distortion), then cut the centred square.
    `image` is a PIL image; returns ComfyUI's IMAGE layout, float [res, res, 3] in [0, 1]."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


class ImageCaptionFolder:
    """kohya convention: `img.png` + `img.txt` side by side (sub-folders included). A missing caption
    becomes "" with a warning; an unreadable image is skipped with a warning; a missing folder or
    one with no usable image raises DataError."""

    def __init__(self, folder, resolution: int = 512, caption_extension: str = ".txt",
                 recursive: bool = True, log_fn=None):
        self.folder = Path(folder).expanduser()
        self.resolution = int(resolution)
        warn = log_fn or log.warning
        if not self.folder.is_dir():
            raise DataError(f"image folder {str(self.folder)!r} does not exist or is not a folder; "
                            "point it at a folder of images with same-name .txt captions")
        pattern = "**/*" if recursive else "*"
        candidates = sorted(p for p in self.folder.glob(pattern)
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        from PIL import Image

        items, skipped, uncaptioned = [], [], []
        for path in candidates:
            try:
                with Image.open(path) as im:
                    # decode the pixels now: verify() passes files whose data is truncated, and one
                    # such file found at encoding time would stop the whole run instead of being skipped
                    im.convert("RGB").load()
            except Exception as e:  # PIL raises many kinds for broken files
                skipped.append(f"{path.name} ({type(e).__name__}: {e})")
                continue
            caption_path = path.with_suffix(caption_extension)
            if caption_path.is_file():
                caption = caption_path.read_text(encoding="utf-8", errors="replace").strip()
            else:
                caption = ""
                uncaptioned.append(path.name)
            items.append(ImageItem(path, caption))
        if skipped:
            warn(f"skipped {len(skipped)} unreadable image(s) in {self.folder}: " + "; ".join(skipped[:5])
                 + (" ..." if len(skipped) > 5 else ""))
        if uncaptioned:
            warn(f"{len(uncaptioned)} image(s) in {self.folder} have no {caption_extension} caption and "
                 "train with an empty caption: " + ", ".join(uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else ""))
        if not items:
            found = f"{len(candidates)} image file(s), none readable" if candidates else "no image files"
            raise DataError(f"no usable training image in {str(self.folder)!r} ({found}); supported "
                            f"extensions: {', '.join(IMAGE_EXTENSIONS)}")
        self.items: list[ImageItem] = items

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    def load_image(self, index: int) -> torch.Tensor:
        """Image `index` cropped to the training resolution: float [res, res, 3] in [0, 1]."""
        from PIL import Image

        item = self.items[index]
        try:
            with Image.open(item.path) as im:
                return center_crop_resize(im, self.resolution)
        except Exception as e:
            raise DataError(f"cannot read training image {str(item.path)!r}: {e}") from e

    def fingerprint(self) -> str:
        """Changes when any file, caption or the resolution changes (keys the latent cache)."""
        h = hashlib.sha256(f"res={self.resolution}".encode())
        for item in self.items:
            st = os.stat(item.path)
            h.update(f"|{item.path}|{st.st_size}|{st.st_mtime_ns}|{item.caption}".encode())
        return h.hexdigest()[:16]


class PromptList:
    """Data-free mode: prompts only; the trainer builds its own latents from noise (SPEC §3)."""

    def __init__(self, prompts: list[str]):
        prompts = [p.strip() for p in prompts if p is not None and p.strip()]
        if not prompts:
            raise DataError("the prompt list is empty; give at least one non-empty prompt "
                            "(one per line in a prompts file)")
        self.prompts: list[str] = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def captions(self) -> list[str]:
        return list(self.prompts)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]


class LatentDataset:
    """Real data that is already encoded: latents in the model's latent space (after
    `process_latent_in`), one caption each. For callers that hold latents rather than image files
    (benchmarks, pipelines that cache their own encodings); trains exactly like an image folder."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        if latents.ndim < 4 or latents.shape[0] == 0:
            raise DataError(f"latents must be a non-empty batch [N, C, ...], got shape {tuple(latents.shape)}")
        if len(captions) != latents.shape[0]:
            raise DataError(f"{latents.shape[0]} latents but {len(captions)} captions; give one caption per latent")
        if not torch.isfinite(latents).all():
            raise DataError("the latents contain NaN or infinite values")
        self.latents = latents.detach().float().cpu().clone()
        self._captions = [str(c) for c in captions]

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def captions(self) -> list[str]:
        return list(self._captions)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.latents.numpy().tobytes())
        h.update("\n".join(self._captions).encode())
        return h.hexdigest()[:16]


def read_prompts_file(path) -> list[str]:
    """One prompt per non-empty line (surrounding whitespace dropped). Missing file -> DataError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"prompts file {str(path)!r} has no non-empty line")
    return prompts


class EpochSampler:
    """Shuffled passes over `n` items, reproducible from `seed`, with a resumable position."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(seed)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_indices(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            from .errors import ResumeMismatch
            raise ResumeMismatch(f"the checkpoint was trained on {state['n']} items, the data now has "
                                 f"{self.n}; resume with the same data")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
