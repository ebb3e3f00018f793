"""Data-free mode (SPEC §3 extension): a buffer of partially denoised teacher trajectories.

Without images there is no x0 to noise to a start level, and starting every step from pure noise
would only ever train the top of the noise range. Instead each buffer entry is a trajectory state
(latent at a grid level, its prompt). A training step continues B entries by K teacher steps (the
same truncated rollout as image mode, so the same per-step cost) and trains on the truncation point;
an entry that reaches t = 0 restarts from fresh noise at the top grid level.

Coverage of noise levels: a fresh trajectory's first continuation takes r ~ U{1 … K} steps instead
of K, so over restarts the truncation points visit every grid level (with K steps only, the levels
would be a fixed lattice N−1−K, N−1−2K, …). At creation the entries are pre-rolled to evenly spread
levels (one-time cost of about size·N/2 teacher evaluations), so the first steps do not all train the
top levels in lockstep.

Random draws (from the trainer's generator): at creation, per entry prompt then noise; at each
restart, for the restarted rows: prompt index, noise, r.
"""
from __future__ import annotations

import torch

from .tdft import NoiseSchedule, ddim_grid, noise_to, teacher_rollout


class TrajectoryBuffer:
    def __init__(self, size: int, latent_shape, n_prompts: int, schedule: NoiseSchedule,
                 grid_size: int, truncation_steps: int, dtype=torch.float32):
        self.size, self.latent_shape = int(size), tuple(latent_shape)
        self.n_prompts = int(n_prompts)
        self.schedule, self.N, self.K = schedule, int(grid_size), int(truncation_steps)
        self.grid = ddim_grid(schedule.T, self.N)
        self.x = torch.zeros((self.size,) + self.latent_shape, dtype=dtype)
        self.index = torch.full((self.size,), self.N - 1, dtype=torch.long)
        self.next_steps = torch.full((self.size,), self.K, dtype=torch.long)
        self.prompt = torch.zeros(self.size, dtype=torch.long)
        self.pointer = 0
        self.initialized = False

    def _fresh(self, rows: torch.Tensor, gen: torch.Generator, first_steps_random: bool = True):
        n = rows.numel()
        self.prompt[rows] = torch.randint(0, self.n_prompts, (n,), generator=gen)
        noise = torch.randn((n,) + self.latent_shape, generator=gen).to(self.x.dtype)
        top = torch.full((n,), int(self.grid[-1]), dtype=torch.long)
        self.x[rows] = noise_to(self.schedule, torch.zeros_like(noise), top, noise)
        self.index[rows] = self.N - 1
        if first_steps_random:
            self.next_steps[rows] = torch.randint(1, self.K + 1, (n,), generator=gen)
        else:
            self.next_steps[rows] = self.K

    def initialize(self, teacher, cond_for, uncond_for, w: float, gen: torch.Generator, device,
                   chunk: int) -> int:
        """Fill with fresh noise and pre-roll entry j by j·N // size grid steps (no training).
        `cond_for(prompt_rows)`/`uncond_for(n)` build conditioning on `device`. Returns evaluations."""
        rows = torch.arange(self.size)
        self._fresh(rows, gen, first_steps_random=False)
        preroll = (rows * self.N) // self.size  # 0 … N−1 grid steps: index stays >= 0
        evaluations = 0
        for start in range(0, self.size, chunk):
            part = rows[start:start + chunk]
            if int(preroll[part].max()) == 0:
                continue
            roll = teacher_rollout(teacher, self.schedule, self.grid, self.x[part].to(device),
                                   self.index[part], preroll[part], w, cond_for(self.prompt[part]),
                                   uncond_for(part.numel()), need_target=False)
            self.x[part] = roll.x_e.to("cpu", self.x.dtype)
            self.index[part] = roll.index_e
            evaluations += roll.evaluations
        self.initialized = True
        return evaluations

    def take(self, count: int) -> torch.Tensor:
        """The next `count` entries, round-robin."""
        rows = (torch.arange(count) + self.pointer) % self.size
        self.pointer = int((self.pointer + count) % self.size)
        return rows

    def store(self, rows: torch.Tensor, x_e: torch.Tensor, index_e: torch.Tensor,
              gen: torch.Generator) -> None:
        """Write continued states back; entries that reached t = 0 restart from fresh noise."""
        self.x[rows] = x_e.detach().to("cpu", self.x.dtype)
        self.index[rows] = index_e.cpu()
        self.next_steps[rows] = self.K
        done = rows[index_e.cpu() < 0]
        if done.numel():
            self._fresh(done, gen)

    def state_dict(self) -> dict:
        return {"x": self.x.clone(), "index": self.index.clone(), "next_steps": self.next_steps.clone(),
                "prompt": self.prompt.clone(), "pointer": self.pointer, "initialized": self.initialized,
                "size": self.size, "n_prompts": self.n_prompts}

    def load_state_dict(self, state: dict) -> None:
        from .errors import ResumeMismatch

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
