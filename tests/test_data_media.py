"""Clips in a training folder as users have them: an audio-only .mp4, a clip that breaks after its
first frames, one cut short, a static GIF. Real files, written with PyAV and PIL."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_setup import TINY_HPARAMS, run
from test_tdft_families import write_clip


def write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def video_packets(path: Path) -> list[tuple[int, int]]:
    """(byte offset, size) of each video packet in the file."""
    import av

    with av.open(str(path)) as container:
        return [(p.pos, p.size) for p in container.demux(video=0) if p.size]


def write_broken_after(path: Path, good_frames: int) -> None:
    """An .mp4 whose video data is zeroed from packet `good_frames` on: the first frames decode, then
    the decoder fails (a damaged download)."""
    write_clip(path, frames=24)
    data = bytearray(path.read_bytes())
    for pos, size in video_packets(path)[good_frames:]:
        data[pos:pos + size] = bytes(size)
    path.write_bytes(bytes(data))


def write_cut_short(path: Path) -> None:
    """A .mkv cut off in its second frame (an interrupted copy): one frame decodes, the header still
    declares the whole 1.5 s."""
    write_clip(path, frames=24)
    second = video_packets(path)[1][0]
    path.write_bytes(path.read_bytes()[: second + 50])


RED = (200, 10, 10)


@pytest.fixture
def folder(tmp_path):
    """Two usable images, a usable clip, a static GIF, and three unusable clips."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "a.png")
    write_clip(root / "good.mp4", frames=12)
    Image.new("RGB", (48, 40), RED).save(root / "still.gif")
    write_audio_only(root / "audio.mp4")
    write_broken_after(root / "broken.mp4", good_frames=6)
    write_cut_short(root / "short.mkv")
    for name in ("a", "good", "still", "audio", "broken", "short"):
        (root / f"{name}.txt").write_text(f"a photo of {name}")
    return root


def test_unusable_clips_are_skipped_naming_why_and_a_static_gif_is_a_still(folder):
    from comfy_selfnpo.training.data import ImageCaptionFolder

    warnings = []
    data = ImageCaptionFolder(folder, 32, log_fn=warnings.append)
    assert [item.path.name for item in data.items] == ["a.png", "good.mp4", "still.gif"]
    text = " ".join(warnings)
    assert "skipped 3 unreadable image(s)/clip(s)" in text
    assert "audio.mp4 (no video stream" in text and "IndexError" not in text
    assert "broken.mp4 (decoding fails after frame " in text
    assert "short.mkv (cut short: only 1 frame(s)" in text
    still = data.items[2]
    assert still.still and not still.is_clip and data.items[1].is_clip
    pixels = data.load_frames(2, 1, 16.0)  # as an image model takes it, and as a one-frame clip
    assert tuple(pixels.shape) == (1, 32, 32, 3)
    assert np.allclose(pixels[0].mean((0, 1)).numpy(), np.array(RED) / 255, atol=2 / 255)


def test_the_cli_trains_on_what_is_usable_and_refuses_a_folder_with_nothing_usable(folder, tmp_path, capsys, tiny):
    tiny.save_checkpoint(str(tmp_path / "tiny.safetensors"), "sd15", seed=0)
    common = ["--checkpoint", tmp_path / "tiny.safetensors", *TINY_HPARAMS, "--steps", 1, "--seed", 1]
    code, err = run(capsys, *common, "--data", folder, "--output", tmp_path / "out")
    assert code == 0 and "3 images" in err, err
    assert "audio.mp4 (no video stream" in err and "broken.mp4 (decoding fails" in err and "short.mkv" in err

    for name in ("a.png", "good.mp4", "still.gif"):
        (folder / name).unlink()
    code, err = run(capsys, *common, "--data", folder, "--output", tmp_path / "out2")
    assert code == 3 and "no usable training image or clip" in err and "3 image/clip file(s), none readable" in err


def test_a_video_model_trains_a_static_gif_as_a_one_frame_clip_and_names_it_beside_longer_clips(tmp_path):
    """frames = 1: the still and the clip's first frame share a batch; frames = 5: a still cannot share
    a batch with 5-frame clips, and the refusal names it."""
    from comfy_selfnpo import tiny_models
    from comfy_selfnpo.training import DataError, TDFTTrainer, make_config
    from comfy_selfnpo.training.data import ImageCaptionFolder

    root = tmp_path / "clips"
    root.mkdir()
    write_clip(root / "good.mp4", frames=12)
    Image.new("RGB", (48, 40), RED).save(root / "still.gif")
    for name in ("good", "still"):
        (root / f"{name}.txt").write_text(f"a photo of {name}")
    ckpt = tiny_models.build_checkpoint("wan21", seed=0)
    settings = dict(mode="lora", resolution=64, batch_size=2, grid_size=10, truncation_steps=3, steps=1,
                    lora_rank=4, lora_alpha=4.0, mixed_precision="no", fps=8.0)
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, ImageCaptionFolder(root, 64),
                          make_config("lora-8gb", frames=1, **settings), tmp_path / "one")
    assert trainer.encoded.latents.shape[0] == 2 and trainer.encoded.latents.shape[2] == 1  # two 1-frame latents
    assert np.isfinite(trainer.train().losses).all()
    with pytest.raises(DataError, match=r"mixes images or one-frame clips \(still.gif\) and clips \(5 frames"):
        TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, ImageCaptionFolder(root, 64),
                    make_config("lora-8gb", frames=5, **settings), tmp_path / "five")
