"""Optional TensorBoard logging for `comfy-selfnpo-train --tensorboard DIR`: loss, learning rate and
step time per step, and the CFG | NPO-CFG previews. Needs the `tensorboard` package (the pack's
`tensorboard` extra); nothing else in the pack imports it."""
from __future__ import annotations


class TensorBoardLog:
    """A session observer (`SessionOptions.observers`)."""

    def __init__(self, folder):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's writer imports the tensorboard package
            raise ImportError("--tensorboard needs the tensorboard package: pip install 'comfy-selfnpo[tensorboard]' "
                              f"({e})") from None
        self.writer = SummaryWriter(log_dir=str(folder))
        self._last = None

    def step(self, progress) -> None:
        self.writer.add_scalar("tdft/loss", progress.loss, progress.step)
        self.writer.add_scalar("tdft/learning_rate", progress.lr, progress.step)
        if self._last is not None:
            self.writer.add_scalar("tdft/seconds_per_step", progress.elapsed_s - self._last, progress.step)
        self._last = progress.elapsed_s

    def preview(self, image, step: int) -> None:
        from .run_files import image_to_tensor

        self.writer.add_image("previews/cfg_vs_npo", image_to_tensor(image)[0], step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
