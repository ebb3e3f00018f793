"""Where the start states of a step's teacher rollouts come from: real latents (`LatentStarts`,
images or clips, docs/algorithm.md §3 step 2) or the data-free trajectory buffer
(`trajectories.TrajectoryStarts`). Chosen once by `make_starts`; both offer

  prepare(teacher, should_stop, progress)   one-time work before the first step (buffer pre-roll)
  next_batch(rng, step, micro)              this process's StartBatch of a micro-batch
  after_rollout(trace, step, micro)         what the rollout changes (the buffer's trajectories)
  state_dict / load_state_dict              the data position, for checkpoints
  kind                                      "images" | "prompts" (a checkpoint records it)

Both work on the *global* batch (batch_size × processes) and hand each process its share, so the
numbers do not depend on how many processes split the batch.
"""
from __future__ import annotations

from . import tdft
from .data import EpochSampler


class LatentStarts:
    """Real latents noised to a random grid level per item (image mode)."""
    kind = "images"

    def __init__(self, encoded, schedule, grid, config, world, device, levels=None):
        self.encoded, self.schedule, self.grid, self.levels = encoded, schedule, grid, levels
        self.steps, self.device = config.truncation_steps, device
        self.global_batch = config.batch_size * world.size
        self.sampler = EpochSampler(encoded.repeats, config.seed)

    def prepare(self, teacher, should_stop=None, progress=None) -> None:
        pass

    def next_batch(self, rng, step: int, micro: int) -> tdft.StartBatch:
        order = self.sampler.next_indices(self.global_batch)  # same on every process
        items = [order[i] for i in rng.items]
        x0 = self.encoded.latents[items].to(self.device)
        cond = self.encoded.conds(items, self.device)
        start = tdft.noised_start(self.schedule, self.grid, x0, cond, rng, self.steps, self.levels)
        if self.encoded.item_unconds is not None:  # each image's crop in its unconditional input too
            start.uncond = self.encoded.unconds(len(items), self.device, items)
        return start

    def after_rollout(self, trace, step: int, micro: int) -> None:
        pass

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def make_starts(encoded, schedule, grid, config, world, device, levels=None):
    """`levels`: the tdft.NoiseLevels the run trains (None: the whole range)."""
    from .trajectories import TrajectoryStarts

    source = LatentStarts if encoded.latents is not None else TrajectoryStarts
    return source(encoded, schedule, grid, config, world, device, levels or tdft.noise_levels(schedule, grid))
