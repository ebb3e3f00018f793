"""The TDFT step math (docs/algorithm.md §3), written in ComfyUI's noise convention and free of model code.

A noisy latent at discrete timestep t is x = a_t·x0 + b_t·ε, with (a, b) = (1, σ) for EPS and
V-prediction models and (1 − σ, σ) for flow (CONST) models; σ_t = model_sampling.sigmas[t]. The
paper works with the rescaled state x̃ = x/a and the noise-to-signal ratio s = b/a (the authors'
`nsr`). Every formula below is that rescaled form multiplied out by a, so nothing divides by a —
a flow model's top level has σ = 1, a = 0, s = ∞:

  DDIM step      x̃_prev = D + s_prev·(x̃ − D)/s_cur   <=>  x_prev = a_prev·D + (b_prev/b_cur)·(x − a_cur·D)
  re-noising     x̃_t = x̃_e + sqrt(s_t² − s_e²)·ε′    <=>  x_t = (a_t/a_e)·x_e + sqrt(b_t² − (a_t·b_e/a_e)²)·ε′

A *denoiser* is any callable D(x, t, cond) -> x0-estimate with t a LongTensor of timesteps (one per
row). The trainer passes ComfyUI's `BaseModel.apply_model` (which returns x0 for EPS, V and CONST
alike); the tests pass an analytic Gaussian denoiser. Conditioning is a dict of batched tensors
(`c_crossattn`, `y`, ...), concatenated along the batch for the joint cond/uncond evaluation.

Random draws come per item from `draws.ItemRandom` (seeded from seed, step, micro-batch and the
item's global index, so a run gives the same numbers on any number of processes), in this order per
item: start grid index and start noise (image mode, `noised_start`), then the student level u and
the re-noising noise ε′ (`tdft_step`).

`tdft_step` is the one composition of the algorithm: the trainer, the tests and the benchmarks all
run it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UnsupportedModel

Denoiser = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


# ----------------------------------------------------------------------------------- schedule


@dataclass
class NoiseSchedule:
    """Per discrete timestep t ∈ {0 … T−1}: σ_t, a_t, b_t (float64 on the CPU for exact math)."""
    sigmas: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    kind: str  # "vp" (EPS / V-prediction: a = 1) or "flow" (CONST: a = 1 − σ)

    @property
    def T(self) -> int:
        return int(self.sigmas.shape[0])

    @classmethod
    def from_model_sampling(cls, model_sampling) -> "NoiseSchedule":
        """Read the schedule from a ComfyUI `model_sampling` object. Supported: discrete-time EPS and
        V_PREDICTION (SD1.x, SD2.x, SDXL) and discrete flow/CONST models (SD3-style). Anything else
        (EDM, continuous-time, image-to-image, Cosmos, Cascade) raises UnsupportedModel."""
        import comfy.model_sampling as ms

        name = type(model_sampling).__name__
        bases = type(model_sampling).__mro__
        unsupported = (ms.EDM, ms.X0, ms.COSMOS_RFLOW, ms.ModelSamplingContinuousEDM,
                       ms.ModelSamplingContinuousV, ms.StableCascadeSampling, ms.ModelSamplingDiscreteEDM)
        if any(u in bases for u in unsupported):
            raise UnsupportedModel(
                f"TDFT cannot train this model: its noise schedule ({name}, bases "
                f"{[b.__name__ for b in bases[1:4]]}) is not a discrete EPS/V-prediction or flow "
                "schedule. Supported: SD1.x, SD2.x (EPS or v), SDXL and discrete flow (CONST) models.")
        sigmas = getattr(model_sampling, "sigmas", None)
        if sigmas is None or sigmas.ndim != 1 or sigmas.shape[0] < 2:
            raise UnsupportedModel(f"TDFT needs a discrete timestep schedule (model_sampling.sigmas); "
                                   f"{name} has none")
        if ms.CONST in bases:
            kind = "flow"
        elif ms.EPS in bases:  # V_PREDICTION derives from EPS; both use x = x0 + σ·ε
            kind = "vp"
        else:
            raise UnsupportedModel(f"TDFT does not know the prediction type of {name}")
        sigmas = sigmas.detach().double().cpu()
        # (a, b) from the model's own noise_scaling: b = scaling(σ, ε=1, x0=0), a = scaling(σ, 0, 1)
        one, zero = torch.ones_like(sigmas), torch.zeros_like(sigmas)
        b = model_sampling.noise_scaling(sigmas, one.clone(), zero.clone())
        a = model_sampling.noise_scaling(sigmas, zero.clone(), one.clone())
        return cls(sigmas=sigmas, a=a.double(), b=b.double(), kind=kind)

    def coeffs(self, t: torch.Tensor, like: torch.Tensor):
        """a_t, b_t, σ_t gathered per row and shaped to broadcast against `like`."""
        shape = (-1,) + (1,) * (like.ndim - 1)
        idx = t.long().cpu()
        return tuple(v[idx].to(device=like.device, dtype=like.dtype).view(shape)
                     for v in (self.a, self.b, self.sigmas))

    def sigma(self, t: torch.Tensor, device=None) -> torch.Tensor:
        return self.sigmas[t.long().cpu()].float().to(device if device is not None else t.device)


def ddim_grid(T: int, N: int) -> torch.Tensor:
    """The authors' DDIM grid: k = T // N, t_i = (i + 1)·k − 1 (39, 79, …, 999 for T=1000, N=25)."""
    k = T // N
    return torch.arange(1, N + 1, dtype=torch.long) * k - 1


# ----------------------------------------------------------------------------------- pieces


def noise_to(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """x_t = a_t·x0 + b_t·ε (ComfyUI's `noise_scaling`)."""
    a, b, _ = schedule.coeffs(t, x0)
    return a * x0 + b * noise


def ddim_step(schedule: NoiseSchedule, x, d, t_cur, t_prev):
    """Deterministic DDIM step from t_cur to t_prev given the x0-estimate d (rescaled form, see top)."""
    a_c, b_c, _ = schedule.coeffs(t_cur, x)
    a_p, b_p, _ = schedule.coeffs(t_prev, x)
    return a_p * d + (b_p / b_c) * (x - a_c * d)


def renoise(schedule: NoiseSchedule, x_e, t_e, t, noise):
    """Paper Eq. 16: continue the forward process from the *truncated state* x_e (level t_e) to
    level t > t_e: x̃_t = x̃_e + sqrt(s_t² − s_e²)·ε′, written without dividing by a_t."""
    a_e, b_e, _ = schedule.coeffs(t_e, x_e)
    a_t, b_t, _ = schedule.coeffs(t, x_e)
    scale = a_t / a_e
    extra = (b_t ** 2 - (scale * b_e) ** 2).clamp_min(0).sqrt()
    return scale * x_e + extra * noise


def draw_student_t(t_e: torch.Tensor, T: int, u: torch.Tensor, t_max: int | None = None) -> torch.Tensor:
    """t ~ U{t_e + 1 … t_max} from u ~ U[0, 1) (the authors' randint(1, T − t_e) offset for t_max = T − 1,
    the default; a Wan 2.2 expert's own range below it: NoiseLevels)."""
    span = ((T - 1 if t_max is None else t_max) - t_e).double()
    return t_e + 1 + torch.floor(u.double() * span).long().clamp_max(span.long() - 1)


def tdft_loss(pred, target, kind: str = "huber", c: float = 0.001):
    """Mean pseudo-Huber sqrt((p − y)² + c²) − c, or mean squared error, in x0 space (float32)."""
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff.pow(2).mean()
    if kind == "huber":
        return (diff.pow(2) + c * c).sqrt().sub(c).mean()
    raise ValueError(f"unknown loss {kind!r}")


def _repeat_to(t: torch.Tensor, length: int) -> torch.Tensor:
    return t.repeat(1, length // t.shape[1], *([1] * (t.ndim - 2)))


# inputs whose second axis is the text tokens: the context and its attention mask (LTXV)
TOKEN_AXIS_KEYS = ("c_crossattn", "attention_mask")


def concat_conds(conds: list[dict]) -> dict:
    """Concatenate conditioning dicts along the batch. Token axes of different lengths (prompts of
    different token counts) are repeated to their least common multiple, context and mask alike, as
    ComfyUI's CONDCrossAttn does: attention over a repeated context is unchanged."""
    out = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        if isinstance(parts[0], list):  # per-row plain values (conditioning.ROW_CONSTANTS)
            out[key] = [row for part in parts for row in part]
            continue
        if key in TOKEN_AXIS_KEYS and len({p.shape[1] for p in parts}) > 1:
            length = math.lcm(*[p.shape[1] for p in parts])
            parts = [_repeat_to(p, length) for p in parts]
        if len({p.shape[1:] for p in parts}) > 1:
            raise ValueError(f"the model input {key!r} has different shapes for different prompts "
                             f"({sorted({tuple(p.shape) for p in parts})}); use batch_size 1")
        out[key] = torch.cat(parts, dim=0)
    return out


def select_cond(cond: dict, rows: torch.Tensor) -> dict:
    return {k: [v[i] for i in rows.tolist()] if isinstance(v, list) else v[rows] for k, v in cond.items()}


def guided_x0(denoise: Denoiser, x, t, cond: dict, uncond: dict, w: float):
    """Corruption guidance D_w = D(c) + w·(D(c) − D(∅)). w = −1 is D(∅) alone (one branch);
    w = 0 is D(c) alone; otherwise both branches run as one batch."""
    if w == -1.0:
        return denoise(x, t, uncond)
    if w == 0.0:
        return denoise(x, t, cond)
    both = denoise(torch.cat([x, x]), torch.cat([t, t]), concat_conds([cond, uncond]))
    d_c, d_u = both.chunk(2)
    return d_c + w * (d_c - d_u)


@dataclass
class Rollout:
    x_e: torch.Tensor       # truncated state (level t_e)
    t_e: torch.Tensor       # truncation timesteps
    index_e: torch.Tensor   # grid index of t_e (−1 when the trajectory reached t = 0 from grid 0)
    target: torch.Tensor    # teacher's guided x0 at (x_e, t_e)
    evaluations: int        # denoiser rows evaluated (per branch)


@torch.no_grad()
def teacher_rollout(denoise: Denoiser, schedule: NoiseSchedule, grid: torch.Tensor, x, index,
                    steps, w: float, cond: dict, uncond: dict, need_target: bool = True) -> Rollout:
    """K = `steps` deterministic DDIM steps down the grid from grid index `index` (per row), then the
    guided x0-prediction at the truncation point. The step below grid index 0 lands on t = 0, where
    the row stays (the authors' mask); so t_e = max(t_s − K·k, 0).

    Each row needs m = min(K, index + 1) steps plus one final evaluation; a row that already stopped
    is not evaluated again (the authors evaluate it and discard the result — same numbers, less work).
    `steps` may be a per-row LongTensor (data-free mode); need_target=False skips the final evaluation.
    """
    index = index.long().cpu()
    grid = grid.long().cpu()
    steps = torch.as_tensor(steps, dtype=torch.long).expand_as(index)
    n_steps = torch.minimum(index + 1, steps)                # m per row
    if not need_target:
        n_steps_eval = n_steps - 1
    else:
        n_steps_eval = n_steps
    cur_index = index.clone()
    t_cur = grid[cur_index]
    x = x.clone()
    target = torch.empty_like(x)
    evaluations = 0
    for j in range(int(n_steps.max()) + 1 if n_steps.numel() else 0):
        rows = (n_steps_eval >= j).nonzero().flatten()       # rows still needing an evaluation
        if rows.numel() == 0:
            break
        dev_rows = rows.to(x.device)
        xr, tr = x[dev_rows], t_cur[rows].to(x.device)
        d = guided_x0(denoise, xr, tr, select_cond(cond, dev_rows), select_cond(uncond, dev_rows), w)
        evaluations += rows.numel()
        final = n_steps[rows] == j
        if final.any():
            target[dev_rows[final.to(x.device)]] = d[final.to(x.device)]
        move = ~final
        if move.any():
            mrows = rows[move]
            prev_index = cur_index[mrows] - 1
            t_prev = torch.where(prev_index >= 0, grid[prev_index.clamp_min(0)], torch.zeros_like(prev_index))
            dm = dev_rows[move.to(x.device)]
            x[dm] = ddim_step(schedule, x[dm], d[move.to(x.device)], t_cur[mrows].to(x.device),
                              t_prev.to(x.device))
            cur_index[mrows] = prev_index
            t_cur[mrows] = t_prev
    return Rollout(x_e=x, t_e=t_cur, index_e=cur_index, target=target, evaluations=evaluations)


@dataclass
class StartBatch:
    """Where a step's teacher rollouts start: states `x` at grid indices `index` (per row), each
    continued by `steps` teacher steps (K, or per row in data-free mode), with the caption
    conditioning `cond` (a dict of batched tensors on x's device)."""
    x: torch.Tensor
    index: torch.Tensor
    steps: torch.Tensor | int
    cond: dict
    uncond: dict | None = None  # the rows' own unconditional input (random crops), else the run's


def noised_start(schedule: NoiseSchedule, grid: torch.Tensor, x0: torch.Tensor, cond: dict, rng,
                 steps: int, levels: "NoiseLevels | None" = None) -> StartBatch:
    """Image mode (algorithm §3 step 2): per item a start grid index i ~ U{lo … hi} (U{0 … N−1} unless
    `levels` restricts it) and noise ε from `rng` (a draws.ItemRandom), x_s = a·x0 + b·ε at level grid[i]."""
    levels = levels or noise_levels(schedule, grid)
    index = rng.randint(levels.hi - levels.lo + 1) + levels.lo
    noise = rng.randn(x0.shape[1:]).to(x0.device, x0.dtype)
    x_s = noise_to(schedule, x0, grid[index].to(x0.device), noise)
    return StartBatch(x=x_s, index=index, steps=levels.steps(index, steps), cond=cond)


@dataclass(frozen=True)
class NoiseLevels:
    """The part of the noise range a run trains: start grid indices lo … hi, student timesteps up to
    t_max. The whole range (0, N − 1, T − 1) unless the model is one Wan 2.2 A14B expert: the high-noise
    expert's rollouts never step below grid index lo (sigma >= boundary), the low-noise expert starts at
    or below hi and its student levels stay below the boundary, so each negative matches the expert
    it guides."""
    lo: int
    hi: int
    t_max: int

    def steps(self, index: torch.Tensor, steps):
        """Teacher steps per row from grid `index`: K (or the given per-row steps), at most down to lo."""
        if self.lo == 0:
            return steps
        return torch.minimum(torch.as_tensor(steps, dtype=torch.long).expand_as(index), index - self.lo)

    def finished(self, index_e: torch.Tensor) -> torch.Tensor:
        """Rows whose trajectory left the range: below grid 0 (t = 0), or down to lo for an expert."""
        return index_e < 0 if self.lo == 0 else index_e <= self.lo


def noise_levels(schedule: NoiseSchedule, grid: torch.Tensor, expert: str = "none",
                 boundary: float = 0.0) -> NoiseLevels:
    """The NoiseLevels of a run (config.expert, config.expert_boundary: a sigma)."""
    N, T = len(grid), schedule.T
    if expert == "none":
        return NoiseLevels(0, N - 1, T - 1)
    if not 0 < boundary < 1:
        raise ValueError(f"expert={expert!r} needs expert_boundary between 0 and 1, got {boundary}")
    high = schedule.sigmas[grid.long()] >= boundary
    if expert == "high_noise":
        levels = NoiseLevels(int(high.nonzero().min()) if high.any() else N, N - 1, T - 1)
    else:
        below = (schedule.sigmas < boundary).nonzero()
        levels = NoiseLevels(0, int((~high).nonzero().max()) if (~high).any() else -1,
                             int(below.max()) if below.numel() else -1)
    if levels.hi - levels.lo < 1:
        raise UnsupportedModel(f"the {expert} expert's range (sigma {'>=' if expert == 'high_noise' else '<'} "
                               f"{boundary:g}) holds {max(0, levels.hi - levels.lo + 1)} of the {N} grid levels; "
                               "raise grid_size (or check the model's shift)")
    return levels


@dataclass
class StepTrace:
    """Every intermediate of one TDFT step (the acceptance tests compare each with a reference)."""
    t_s: torch.Tensor
    x_s: torch.Tensor
    t_e: torch.Tensor
    index_e: torch.Tensor
    x_e: torch.Tensor
    target: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    pred: torch.Tensor
    loss: torch.Tensor
    teacher_evaluations: int = 0


def tdft_step(student: Denoiser, teacher: Denoiser, schedule: NoiseSchedule, grid: torch.Tensor,
              start: StartBatch, uncond: dict, rng, w: float = -1.0, loss: str = "huber",
              huber_c: float = 0.001, t_max: int | None = None) -> StepTrace:
    """One TDFT step, algorithm §3 steps 3–5: the teacher's truncated rollout from `start`, then the
    student regression. Per item, t ~ U{t_e + 1 … t_max} (T − 1 unless a Wan 2.2 expert's range
    ends lower); the *truncated state* x_e is re-noised to
    t (Eq. 16); the student predicts x0 at (x_t, t, caption); the loss compares it with the teacher's
    x0 at the truncation point. `rng` is a draws.ItemRandom over the batch. The caller
    backpropagates `trace.loss` and steps the optimizer / EMA."""
    roll = teacher_rollout(teacher, schedule, grid, start.x, start.index, start.steps, w, start.cond, uncond)
    x_e = roll.x_e
    u = rng.rand()
    noise2 = rng.randn(x_e.shape[1:]).to(x_e.device, x_e.dtype)
    t = draw_student_t(roll.t_e, schedule.T, u, t_max)
    x_t = renoise(schedule, x_e, roll.t_e.to(x_e.device), t.to(x_e.device), noise2)
    pred = student(x_t, t.to(x_e.device), start.cond)
    return StepTrace(t_s=grid[start.index.long().cpu()], x_s=start.x, t_e=roll.t_e, index_e=roll.index_e,
                     x_e=x_e, target=roll.target, t=t, x_t=x_t, pred=pred,
                     loss=tdft_loss(pred, roll.target, loss, huber_c), teacher_evaluations=roll.evaluations)
