"""Training data: a kohya-style image folder with captions, already-encoded latents, or a list of
prompts (data-free mode).

These classes only find, check and read the data; encoding with the loaded VAE/CLIP happens once in
the trainer (encoding.py), so this module has no model code and no ComfyUI dependency.

Every data kind offers: `captions` (one per item), `repeats` (how often each item appears in an
epoch), `fingerprint()` (changes when the content changes; a resumed run must see the same data)
and `overlaps(folder)` (would files written to `folder` become training data?).
"""
from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError

log = logging.getLogger("comfy_selfnpo.training")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CLIP_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".gif")  # decoded with PyAV (a ComfyUI dependency)
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS + CLIP_EXTENSIONS
# kohya's convention: a sub-folder named "<repeats>_<name>" shows its images <repeats> times an epoch
REPEAT_FOLDER = re.compile(r"^(\d+)_.+")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    repeats: int = 1
    still: bool = False  # a clip file with a single frame (a static GIF): trains as an image

    @property
    def is_clip(self) -> bool:
        return self.path.suffix.lower() in CLIP_EXTENSIONS and not self.still


def read_text_file(path, what: str) -> str:
    """A text file as str: UTF-8 (with or without BOM) or UTF-16 with a BOM. Anything else is refused
    with the file's name instead of being read with replacement characters."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the {what} {str(path)!r}: {e.strerror or e}") from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"the {what} {str(path)!r} is not UTF-8 text (undecodable byte at position {e.start}); "
                        "save it as UTF-8") from None


def to_rgb(image):
    """A PIL image as 8-bit RGB, upright: EXIF orientation applied, 16/32-bit grey scaled down (PIL's
    own convert clips them: a 16-bit PNG would turn white), alpha dropped."""
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() <= 65535 else float(values.max())
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def center_crop_resize(image, resolution: int) -> torch.Tensor:
    """Aspect-aware crop as the authors' SD1.5 data pipeline does it (Resize(res) then CenterCrop(res)):
    scale so the *shorter* side equals `resolution` (no distortion), then cut the centred square.
    `image` is a PIL image; returns ComfyUI's IMAGE layout, float [res, res, 3] in [0, 1]."""
    return crop_resize(image, resolution)[0]


def crop_box(w: int, h: int, resolution: int, at: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """(resized width, resized height, top, left) of crop_resize's cut of a w × h image."""
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    room_w, room_h = new_w - resolution, new_h - resolution
    if at is None:
        return new_w, new_h, room_h // 2, room_w // 2
    return new_w, new_h, min(int(at[1] * (room_h + 1)), room_h), min(int(at[0] * (room_w + 1)), room_w)


def crop_resize(image, resolution: int, at: tuple[float, float] | None = None):
    """Scale so the shorter side equals `resolution`, then cut the square: the centred one, or the one
    at `at` (fractions in [0, 1) of the positions left and top: a random draw for the authors' SDXL
    RandomCrop, which picks any of them uniformly).
    Returns (float [res, res, 3] in [0, 1], (top, left) in pixels: SDXL's crop micro-conditioning)."""
    import numpy as np
    from PIL import Image

    image = to_rgb(image)
    new_w, new_h, top, left = crop_box(*image.size, resolution, at)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0), (top, left)


def find_images(folder: Path, recursive: bool = True, extensions=MEDIA_EXTENSIONS) -> list[Path]:
    """Image and clip files under `folder`, sorted; follows symlinked folders (each real folder once)."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link loop, or the same folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in extensions]
        if not recursive:
            break
    return sorted(found)


def _repeats_of(path: Path, folder: Path) -> int:
    """The kohya repeat count of the nearest "<N>_name" folder between `folder` and `path` (1 if none)."""
    for part in reversed(path.relative_to(folder).parts[:-1]):
        match = REPEAT_FOLDER.match(part)
        if match:
            return max(1, int(match.group(1)))
    return 1


def _inside(path, folder) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


class ImageCaptionFolder:
    """kohya convention: `img.png` + `img.txt` side by side (sub-folders included, "<N>_name" folders
    repeated N times an epoch). Video models also take clips (`clip.mp4` + `clip.txt`; .webm, .mov,
    .mkv, .gif), and train images as one-frame clips. A missing caption becomes "" with a warning; an
    unreadable file is skipped with a warning; a missing folder or one with nothing usable raises
    DataError."""

    def __init__(self, folder, resolution: int = 512, caption_extension: str = ".txt",
                 recursive: bool = True, log_fn=None):
        self.folder = Path(folder).expanduser()
        self.resolution = int(resolution)
        if not caption_extension.startswith("."):
            caption_extension = "." + caption_extension  # "txt" means ".txt"
        self.caption_extension = caption_extension
        warn = log_fn or log.warning
        if not self.folder.is_dir():
            raise DataError(f"image folder {str(self.folder)!r} does not exist or is not a folder; "
                            "point it at a folder of images with same-name .txt captions")
        candidates = find_images(self.folder, recursive)
        items, skipped, uncaptioned = [], [], []
        for path in candidates:
            problem, frames = _unreadable(path)
            if problem:
                skipped.append(f"{path.name} ({problem})")
                continue
            caption_path = path.with_suffix(caption_extension)
            caption = read_text_file(caption_path, "caption file").strip() if caption_path.is_file() else None
            if caption is None:
                uncaptioned.append(path.name)
            items.append(ImageItem(path, caption or "", _repeats_of(path, self.folder), still=frames == 1))
        _warn_list(warn, skipped, f"skipped {len(skipped)} unreadable image(s)/clip(s) in {self.folder}: ")
        _warn_list(warn, uncaptioned, f"{len(uncaptioned)} image(s) in {self.folder} have no {caption_extension} "
                   "caption and train with an empty caption: ")
        if not items:
            found = f"{len(candidates)} image/clip file(s), none readable" if candidates else "no image files"
            raise DataError(f"no usable training image or clip in {str(self.folder)!r} ({found}); supported "
                            f"extensions: {', '.join(MEDIA_EXTENSIONS)}")
        self.items: list[ImageItem] = items
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    @property
    def repeats(self) -> list[int]:
        return [item.repeats for item in self.items]

    @property
    def has_clips(self) -> bool:
        return any(item.is_clip for item in self.items)

    def load_image(self, index: int, at: tuple[float, float] | None = None) -> torch.Tensor:
        """Image `index` cropped to the training resolution: float [res, res, 3] in [0, 1]."""
        return self.load_cropped(index, at)[0]

    def crop_origin(self, index: int, at: tuple[float, float] | None = None) -> tuple[int, int]:
        """(top, left) of the cut load_cropped makes, from the file's header (size, EXIF orientation)."""
        from PIL import Image

        path = self.items[index].path
        if path.suffix.lower() in CLIP_EXTENSIONS:  # a still clip: its frame's size
            return crop_box(*first_frame(path).size, self.resolution, at)[2:]
        with Image.open(path) as im:
            w, h = im.size
            turned = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # rotated by 90°: exif_transpose swaps the sides
        return crop_box(*((h, w) if turned else (w, h)), self.resolution, at)[2:]

    def load_cropped(self, index: int, at: tuple[float, float] | None = None):
        """(image `index` cut at `at` as crop_resize cuts it, (top, left) of the cut)."""
        from PIL import Image

        item = self.items[index]
        if item.path.suffix.lower() in CLIP_EXTENSIONS:  # a still clip (one frame, e.g. a static GIF): an image
            return crop_resize(first_frame(item.path), self.resolution, at)
        try:
            with Image.open(item.path) as im:
                return crop_resize(im, self.resolution, at)
        except Exception as e:
            raise DataError(f"cannot read training image {str(item.path)!r}: {e}") from e

    def load_frames(self, index: int, frames: int, fps: float) -> torch.Tensor:
        """Item `index` as [F, res, res, 3] in [0, 1]: a clip's first `frames` frames at `fps`, or an
        image as a one-frame clip."""
        item = self.items[index]
        if not item.is_clip:
            return self.load_image(index)[None]
        return read_clip(item.path, frames, fps, self.resolution)

    def fingerprint(self) -> str:
        """Changes when an image's bytes, a caption, a repeat count or the resolution change (not when
        the folder is moved or copied)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"res={self.resolution}".encode())
            for item in self.items:
                rel = item.path.relative_to(self.folder).as_posix()
                h.update(f"|{rel}|{item.repeats}|{item.caption}|".encode())
                h.update(hashlib.sha256(item.path.read_bytes()).digest())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def overlaps(self, folder) -> bool:
        return _inside(folder, self.folder)


def read_clip(path: Path, frames: int, fps: float, resolution: int) -> torch.Tensor:
    """A clip's first `frames` frames sampled at `fps` — the frame on screen at times 0, 1/fps, 2/fps,
    ... — each centre-cropped like an image: [frames, res, res, 3] in [0, 1]. DataError when the clip
    is shorter than (frames − 1)/fps seconds."""
    import av

    wanted = [i / fps for i in range(frames)]
    picked, last, start, times = [], None, None, []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                time = float(frame.time) if frame.time is not None else len(times) / fps
                start = time if start is None else start
                time -= start  # a clip may not start at time 0
                while len(picked) < frames and last is not None and wanted[len(picked)] < time - 1e-6:
                    picked.append(last)  # frame `last` was on screen until this one came
                if len(picked) == frames:
                    break
                last, times = frame.to_image(), times + [time]
    except Exception as e:  # PyAV raises many kinds for broken files
        raise DataError(f"cannot read the clip {str(path)!r}: {type(e).__name__}: {e}") from e
    shown_for = (times[-1] - times[-2]) if len(times) > 1 else 1.0 / fps  # the last frame's duration
    while len(picked) < frames and last is not None and wanted[len(picked)] < times[-1] + shown_for - 1e-6:
        picked.append(last)
    if len(picked) < frames:
        raise DataError(f"the clip {str(path)!r} is too short: it covers {len(picked)} of the {frames} frames the "
                        f"run samples at {fps:g} fps; use longer clips, fewer frames or a lower fps")
    return torch.stack([center_crop_resize(image, resolution) for image in picked])


def first_frame(path: Path):
    """The first frame of a clip as a PIL image (a still clip: a static GIF, a one-frame video)."""
    import av

    try:
        with av.open(str(path)) as container:
            return next(container.decode(video=0)).to_image()
    except Exception as e:  # PyAV raises many kinds for broken files
        raise DataError(f"cannot read the clip {str(path)!r}: {type(e).__name__}: {e}") from e


def _unreadable(path: Path) -> tuple[str | None, int]:
    """(why an image or clip file cannot be used or None, its frame count: 1 for an image). Decodes the
    pixels now: verify() passes files whose data is truncated, and one found at encoding time would
    stop the whole run instead."""
    from PIL import Image

    if path.suffix.lower() in CLIP_EXTENSIONS:
        return _scan_clip(path)
    try:
        with Image.open(path) as im:
            to_rgb(im).load()
    except Exception as e:  # PIL raises many kinds for broken files
        return f"{type(e).__name__}: {e}", 0
    return None, 1


def _scan_clip(path: Path) -> tuple[str | None, int]:
    """Decode every frame of a clip once (without converting pixels): a clip that breaks after its first
    frames, or that holds far fewer frames than its header declares (cut short), is unusable, found
    now rather than in the middle of encoding. One frame (a static GIF): a still image."""
    import av

    times = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream (an audio-only file?)", 0
            stream = container.streams.video[0]
            declared, rate = _declared_seconds(container, stream), float(stream.average_rate or 0) or 16.0
            for frame in container.decode(stream):
                times.append(float(frame.time) if frame.time is not None else len(times) / rate)
    except Exception as e:  # PyAV raises many kinds for broken files
        where = f"after frame {len(times)}" if times else "at its first frame"
        return f"decoding fails {where}: {type(e).__name__}: {e}", len(times)
    if not times:
        return "no frame decodes", 0
    covered = times[-1] - times[0] + 1.0 / rate
    if declared and covered < declared / 2 and declared - covered > 0.5:
        return (f"cut short: only {len(times)} frame(s), {covered:.2f} s, decode of the {declared:.2f} s its header "
                "declares"), len(times)
    return None, len(times)


def _declared_seconds(container, stream) -> float | None:
    """The video's duration as the file's header states it (None when it does not)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:  # no audio track to be longer
        return container.duration / 1_000_000
    return None


def _warn_list(warn, names: list[str], prefix: str) -> None:
    if names:
        warn(prefix + "; ".join(names[:5]) + (" ..." if len(names) > 5 else ""))


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

    @property
    def repeats(self) -> list[int]:
        return [1] * len(self)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.latents.numpy().tobytes())
        h.update("\n".join(self._captions).encode())
        return h.hexdigest()[:16]

    def overlaps(self, folder) -> bool:
        return False


class PromptList:
    """Prompt-only mode (this pack's extension): the trainer builds its own latents from noise (docs/algorithm.md §3)."""

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

    @property
    def repeats(self) -> list[int]:
        return [1] * len(self)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()[:16]

    def overlaps(self, folder) -> bool:
        return False


def read_prompts_file(path) -> list[str]:
    """One prompt per non-empty line (surrounding whitespace dropped). Missing file -> DataError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in read_text_file(path, "prompts file").splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"prompts file {str(path)!r} has no non-empty line")
    return prompts


DEFAULT_PROMPTS_FILE = Path(__file__).with_name("default_prompts.txt")


def default_prompts() -> PromptList:
    """The pack's own prompt list (default_prompts.txt, `#` lines are comments): what prompt-only
    training uses when it is given no prompts and no images."""
    lines = read_text_file(DEFAULT_PROMPTS_FILE, "default prompts file").splitlines()
    return PromptList([line for line in lines if not line.lstrip().startswith("#")])


class EpochSampler:
    """Shuffled passes over the items (each as often as its repeat count), reproducible from `seed`,
    with a resumable position."""

    def __init__(self, repeats: list[int], seed: int):
        self.population = [i for i, r in enumerate(repeats) for _ in range(r)]
        self.n, self.seed = len(self.population), int(seed)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return [self.population[i] for i in torch.randperm(self.n, generator=g).tolist()]

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
