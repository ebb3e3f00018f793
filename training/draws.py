"""Random draws keyed by what they are for, not by the order in which a process happens to make them.

Every per-item draw of a training step comes from a generator seeded with (seed, step, micro-batch,
global item index); every per-slot draw of the data-free trajectory buffer from (seed, purpose, step,
slot). A run split over 2 processes with batch b therefore draws exactly the numbers of one process
with batch 2b, a resumed run needs no generator state, and a failed step can simply be redone.

Generators live on the CPU, so a seed gives the same numbers on any device.
"""
from __future__ import annotations

from typing import Sequence

import torch

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing integer `parts` (order matters); well spread even for adjacent inputs."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK))
    return h >> 1  # torch.Generator.manual_seed takes values below 2**63


# purposes of draws (the first part of every derived seed, so streams never collide)
STEP_ITEM, BUFFER_START, BUFFER_RESTART, LORA_INIT, IMAGE_CROP = 1, 2, 3, 4, 5


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


class ItemRandom:
    """One generator per batch item. Each item draws in this documented order (tests replay it):
    image mode: start grid index, start noise; then, every mode: student level u, re-noising noise ε′."""

    def __init__(self, seed: int, step: int, micro: int, items: Sequence[int]):
        self.items = [int(i) for i in items]
        self._gens = [generator(STEP_ITEM, seed, step, micro, i) for i in self.items]

    def __len__(self) -> int:
        return len(self._gens)

    def randint(self, high: int) -> torch.Tensor:
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self._gens])

    def rand(self) -> torch.Tensor:
        return torch.cat([torch.rand((1,), generator=g, dtype=torch.float64) for g in self._gens])

    def randn(self, shape) -> torch.Tensor:
        """[B, *shape] float32, row i from item i's generator."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self._gens])
