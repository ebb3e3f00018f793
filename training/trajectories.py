"""Prompt-only mode, this pack's extension (docs/algorithm.md §3; the paper's "data-free" means without
preference data, its released training starts from real images): a buffer of partially denoised
teacher trajectories.

Without images there is no x0 to noise to a start level, and starting every step from pure noise
would only ever train the top of the noise range. Instead each buffer slot is a trajectory state
(latent at a grid level, its prompt). A training step continues B slots by K teacher steps (the same
truncated rollout as image mode, so the same per-step cost) and trains on the truncation point; a
slot that reaches t = 0 restarts from fresh noise at the top grid level.

Coverage of noise levels: a restarted trajectory's first continuation takes r ~ U{1 … K} steps
instead of K, so over restarts the truncation points visit every grid level (with K steps only, the
levels would be a fixed lattice N−1−K, N−1−2K, …). At creation the slots are pre-rolled to evenly
spread levels (one-time cost of about size·N/2 teacher evaluations), so the first steps do not all
train the top levels in lockstep.

Several processes: every process holds the whole buffer. A micro-batch takes the next B·P slots
round-robin (P processes); each process continues its share, and the continued rows are gathered
so that every copy of the buffer stays identical — and equal to a single process's with batch B·P.

Random draws, keyed by slot (draws.py): at creation, per slot its prompt then its noise; at a
restart (step s, micro-batch m), per slot its prompt, noise and r.
"""
from __future__ import annotations

import torch

from . import draws
from .errors import DataError, ResumeMismatch, TrainingCancelled
from .tdft import StartBatch, noise_levels, noise_to, teacher_rollout


class TrajectoryStarts:
    kind = "prompts"

    def __init__(self, encoded, schedule, grid, config, world, device, levels=None):
        self.encoded, self.schedule, self.grid = encoded, schedule, grid
        self.levels = levels or noise_levels(schedule, grid)
        if self.levels.hi < len(grid) - 1:
            raise DataError("the low-noise expert of Wan 2.2 A14B cannot train from prompts only: its rollouts "
                            "would start from states only the high-noise expert makes; give it images or clips "
                            "(a data folder)")
        self.world, self.device = world, device
        self.seed, self.w = config.seed, config.corruption_guidance
        self.N, self.K, self.per_process = len(grid), config.truncation_steps, config.batch_size
        self.size, self.n_prompts = config.trajectory_buffer, len(encoded.item_conds)
        self.global_batch = self.per_process * world.size
        if self.size < self.global_batch:
            raise DataError(f"trajectory_buffer={self.size} is smaller than the global batch "
                            f"{self.global_batch} (batch_size × processes); raise trajectory_buffer")
        self.latent_shape = tuple(encoded.latent_shape)
        self.x = torch.zeros((self.size,) + self.latent_shape)
        self.index = torch.full((self.size,), self.N - 1, dtype=torch.long)
        self.next_steps = torch.full((self.size,), self.K, dtype=torch.long)
        self.prompt = torch.zeros(self.size, dtype=torch.long)
        self.pointer = 0
        self.initialized = False
        self._slots = self._mine = None

    # ------------------------------------------------------------------ slots

    def _fresh(self, slot: int, gen: torch.Generator) -> None:
        """Slot `slot` restarts: a random prompt and pure noise at the top grid level."""
        self.prompt[slot] = torch.randint(0, self.n_prompts, (1,), generator=gen)
        noise = torch.randn(self.latent_shape, generator=gen)
        top = torch.full((1,), int(self.grid[-1]), dtype=torch.long)
        self.x[slot] = noise_to(self.schedule, torch.zeros_like(noise)[None], top, noise[None])[0]
        self.index[slot] = self.N - 1

    def _share(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """This process's part of `rows` (consecutive blocks of batch_size in rank order), and every
        process's count."""
        b, r = self.per_process, self.world.rank
        counts = [max(0, min(b, rows.numel() - p * b)) for p in range(self.world.size)]
        return rows[r * b: r * b + counts[r]], counts

    def _gather(self, rows_all: torch.Tensor, counts: list[int], x, index, next_steps, prompt) -> None:
        """Every process's continued rows into every copy of the buffer."""
        gather = self.world.gather_rows
        self.x[rows_all] = gather(x.to("cpu", self.x.dtype), counts)
        self.index[rows_all] = gather(index.cpu(), counts)
        self.next_steps[rows_all] = gather(next_steps.cpu(), counts)
        self.prompt[rows_all] = gather(prompt.cpu(), counts)

    # ------------------------------------------------------------------ the source interface

    def prepare(self, teacher, should_stop=None, progress=None) -> None:
        """Fill with fresh noise and pre-roll slot j by j·N // size grid steps (no training).
        `should_stop()` is asked between chunks (agreed by every process); stopping leaves the buffer
        uninitialised, so a resumed run pre-rolls again."""
        if self.initialized:
            return
        for slot in range(self.size):
            self._fresh(slot, draws.generator(draws.BUFFER_START, self.seed, slot))
            self.next_steps[slot] = self.K
        span = self.N - self.levels.lo  # 0 … span − 1 grid steps: the index stays in the range
        preroll = (torch.arange(self.size) * span) // self.size
        for start in range(0, self.size, self.global_batch):
            if should_stop is not None and should_stop():
                raise TrainingCancelled("stopped while pre-rolling the trajectory buffer", step=0)
            chunk = torch.arange(start, min(start + self.global_batch, self.size))
            mine, counts = self._share(chunk)
            x, index = self.x[mine].to(self.device), self.index[mine]
            if mine.numel():
                roll = teacher_rollout(teacher, self.schedule, self.grid, x, index, preroll[mine], self.w,
                                       self.encoded.conds(self.prompt[mine].tolist(), self.device),
                                       self.encoded.unconds(mine.numel(), self.device), need_target=False)
                x, index = roll.x_e, roll.index_e
            self._gather(chunk, counts, x, index, self.next_steps[mine], self.prompt[mine])
            if progress is not None:
                progress(int(chunk[-1]) + 1, self.size)
        self.initialized = True

    def next_batch(self, rng, step: int, micro: int) -> StartBatch:
        self._slots = (torch.arange(self.global_batch) + self.pointer) % self.size
        self.pointer = int((self.pointer + self.global_batch) % self.size)
        self._mine = self._slots[list(rng.items)]
        rows = self._mine
        index = self.index[rows].clone()
        return StartBatch(x=self.x[rows].to(self.device), index=index,
                          steps=self.levels.steps(index, self.next_steps[rows].clone()),
                          cond=self.encoded.conds(self.prompt[rows].tolist(), self.device))

    def after_rollout(self, trace, step: int, micro: int) -> None:
        """Store the continued states; slots that reached t = 0 (an expert: the bottom of its range)
        restart from fresh noise."""
        mine = self._mine
        self.x[mine] = trace.x_e.detach().to("cpu", self.x.dtype)
        self.index[mine] = trace.index_e.cpu()
        self.next_steps[mine] = self.K
        for slot in mine[self.levels.finished(trace.index_e.cpu())].tolist():
            gen = draws.generator(draws.BUFFER_RESTART, self.seed, step, micro, slot)
            self._fresh(slot, gen)
            self.next_steps[slot] = int(torch.randint(1, self.K + 1, (1,), generator=gen))
        _, counts = self._share(self._slots)
        self._gather(self._slots, counts, self.x[mine], self.index[mine], self.next_steps[mine], self.prompt[mine])

    def state_dict(self) -> dict:
        return {"x": self.x.clone(), "index": self.index.clone(), "next_steps": self.next_steps.clone(),
                "prompt": self.prompt.clone(), "pointer": self.pointer, "initialized": self.initialized,
                "size": self.size, "n_prompts": self.n_prompts}

    def load_state_dict(self, state: dict) -> None:
        if int(state["size"]) != self.size or int(state["n_prompts"]) != self.n_prompts:
            raise ResumeMismatch(
                f"the checkpoint's trajectory buffer has {state['size']} entries over {state['n_prompts']} "
                f"prompts, this run {self.size} over {self.n_prompts}; resume with the same prompts and "
                "trajectory_buffer")
        self.x.copy_(state["x"])
        self.index.copy_(state["index"])
        self.next_steps.copy_(state["next_steps"])
        self.prompt.copy_(state["prompt"])
        self.pointer, self.initialized = int(state["pointer"]), bool(state["initialized"])
