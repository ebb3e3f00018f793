"""Training on several processes (GPUs, machines) with torch's own distributed engine.

`torchrun` starts one process per device and tells each its rank through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); `world_from_environment()` turns that into a
`ProcessGroupWorld` (NCCL on GPUs, gloo on the CPU), or a `LocalWorld` for an ordinary single
process. The trainer and the session only talk to the world object, so nothing else asks "are we
distributed?":

  * each process trains `batch_size` items of every micro-batch: global items
    [rank·b, (rank+1)·b) of the global batch b × size (`items`);
  * the trainable module is wrapped in DistributedDataParallel (`wrap`), which averages gradients
    over the processes during the backward pass (`accumulating` skips that for all but the last
    micro-batch of a gradient-accumulation step);
  * a few small collectives keep the processes in step: the mean loss, "does any process want to
    stop / see a non-finite loss", and gathering trajectory-buffer rows;
  * only the main process (rank 0) writes files (`is_main`).
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch

from .errors import ProcessesDisagree


class LocalWorld:
    """One process: every collective is the identity."""
    rank, size, local_rank = 0, 1, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def items(self, per_process: int) -> range:
        """Global item indices of this process within a micro-batch."""
        return range(self.rank * per_process, (self.rank + 1) * per_process)

    def wrap(self, module: torch.nn.Module, may_skip_parameters: bool = False) -> torch.nn.Module:
        return module

    def accumulating(self, module, last: bool):
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        return float(value)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return rows

    def main_only(self, fn):
        """fn() on the main process (the one that writes files); None elsewhere."""
        return fn() if self.is_main else None

    def from_main(self, fn):
        """fn() computed by the main process and handed to every process; an exception it raises is
        raised on every process."""
        return fn()

    def barrier(self) -> None:
        pass

    def check_same_job(self, facts) -> None:
        """Every process runs the same job: `facts()` (what defines the job: name -> value) must be
        equal on every process, else ProcessesDisagree on every process. One process: nothing to do."""

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "1 process"


class ProcessGroupWorld(LocalWorld):
    """A process of a torch.distributed job (started by torchrun)."""

    def __init__(self, rank: int, size: int, local_rank: int, device: torch.device):
        self.rank, self.size, self.local_rank, self.device = rank, size, local_rank, device

    def wrap(self, module, may_skip_parameters: bool = False):
        """DDP over `module`'s parameters. may_skip_parameters: some forward passes leave parameters
        unused (DDP then searches the graph for them each step, which costs a little)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=may_skip_parameters)

    def accumulating(self, module, last: bool):
        return contextlib.nullcontext() if last else module.no_sync()

    def _all_reduce(self, value: float, op) -> float:
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=op)
        return float(t.item())

    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        return self._all_reduce(value, dist.ReduceOp.SUM) / self.size

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist

        return self._all_reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0

    def gather_rows(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every process's `rows` in rank order; process r contributes counts[r] rows."""
        import torch.distributed as dist

        longest = max(counts)
        padded = torch.zeros((longest,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=self._comm_device())
        padded[: rows.shape[0]] = rows.to(padded.device)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(rows.device)

    def from_main(self, fn):
        import torch.distributed as dist

        box = [None]
        if self.is_main:
            try:
                box[0] = ("value", fn())
            except Exception as e:  # every process must learn it, or the others wait forever
                box[0] = ("error", e)
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def check_same_job(self, facts) -> None:
        import torch.distributed as dist

        everyone = [None] * self.size
        dist.all_gather_object(everyone, facts())
        differences = job_differences(everyone)
        if differences:  # every process sees the same list and refuses with the same message
            raise ProcessesDisagree(
                "the processes of this torchrun job were not started for the same job: "
                + "; ".join(differences) + ". Start every process (on every machine) with the same model "
                "files, data and settings; nothing was trained")

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def describe(self) -> str:
        return f"process {self.rank} of {self.size} (local rank {self.local_rank})"


def job_differences(everyone: list[dict]) -> list[str]:
    """What each process's facts have that process 0's do not, naming both values."""
    first, out = everyone[0], []
    for rank, facts in enumerate(everyone[1:], start=1):
        for name in list(first) + [name for name in facts if name not in first]:
            if first.get(name) != facts.get(name):
                out.append(f"{name}: process 0 has {first.get(name)!r}, process {rank} has {facts.get(name)!r}")
    return out


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def select_local_device(use_cuda: bool) -> None:
    """Before ComfyUI is imported: each process of a multi-GPU job uses the GPU of its local rank
    (ComfyUI's model management takes the current CUDA device)."""
    if use_cuda and launched_by_torchrun():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def world_from_environment(device: torch.device, timeout_s: float | None = None) -> LocalWorld:
    """The world this process belongs to. Under torchrun: joins the process group (NCCL for CUDA
    devices, gloo otherwise); `timeout_s` bounds how long a collective waits for a lost process."""
    if not launched_by_torchrun():
        return LocalWorld()
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if timeout_s:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **kwargs)
    return ProcessGroupWorld(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                             device)
