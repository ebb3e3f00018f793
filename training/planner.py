"""The planner: peak accelerator memory and compute of a training run, before it starts, on any machine.

It runs one real optimizer step of the pack's own code — `make_trained` (full weights or LoRA, the
teacher), `Optimization` (AdamW, mixed precision, clipping), `gradient_checkpointing` and
`tdft.tdft_step` (teacher rollout, student forward and backward) — on fake tensors (fake_tensors.py),
with the model rebuilt from its ComfyUI config in the dtype ComfyUI stores it in on a GPU. Nothing is
allocated, so it works for any model size on a CPU. The figures:

  memory   bytes of the fake tensors alive at the step's peak, split into base weights, trainable
           parameters, gradients, optimizer state, teacher copy and activations/temporaries
  compute  torch.utils.flop_counter's formulas over the same step (teacher and student), per optimizer step

What it assumes, so the figures are those of the steady state of a run on a CUDA GPU:
  * the optimizer state already exists (it does from the second step on), and with gradient
    accumulation the earlier micro-batches' gradients too (the peak is in a later micro-batch);
  * AdamW runs its multi-tensor (foreach) path, as on a GPU, and attention is PyTorch's
    scaled_dot_product_attention (fake_tensors.target_attention);
  * 8-bit AdamW holds 2 bytes per parameter (bitsandbytes' blockwise states): the step is traced with
    float32 AdamW and the difference subtracted;
  * not counted: the CUDA context and allocator slack (`CARD_RESERVE_GB` is kept free per card),
    the text encoder and VAE (the trainer encodes the data first and ComfyUI can unload them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from . import tdft
from .autograd_safety import INPLACE_ERROR, saved_tensor_copies
from .draws import ItemRandom
from .fake_tensors import FlopTally, HostFakeMode, MemoryTracker, fake_module_casts, target_attention
from .grad_checkpointing import gradient_checkpointing
from .optimization import Optimization
from .trained import make_trained

GIB = 2 ** 30
SAVED_COPIES_NOTE = "its blocks update tensors in place: autograd keeps copies of what it saves (as in training)"
CARDS_GB = (8, 12, 16, 24, 48, 80)
CARD_RESERVE_GB = 1.0  # CUDA context (~0.5 GB) and the caching allocator's slack, kept free on every card


@dataclass
class Plan:
    """One training step's predicted peak memory (bytes) and compute (FLOP per optimizer step)."""
    model: str
    weight_dtype: str
    attention: str
    checkpointing: bool
    peak: int
    peak_phase: str
    parts: dict[str, int]                 # what the peak holds, by kind
    weights_by_dtype: dict[str, int]      # every weight tensor (base, trainable, teacher), by dtype
    trainable_params: int
    teacher_flop: float
    student_flop: float
    seconds: float
    other_checkpointing_peak: int | None = None  # the peak with gradient checkpointing switched
    # LoRA runs only: the peak when ComfyUI keeps the frozen base in CPU memory and casts each layer
    # in as it runs (partial loading; the trainer streams it, streaming.py): the peak without the
    # base weights, plus the largest base layer twice (the one running and the next one cast in)
    streamed_peak: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def flop(self) -> float:
        return self.teacher_flop + self.student_flop

    def fits(self, card_gb: float) -> bool:
        return self.peak <= (card_gb - CARD_RESERVE_GB) * GIB

    def smallest_card(self) -> int | None:
        return next((gb for gb in CARDS_GB if self.fits(gb)), None)

    def fits_streamed(self, card_gb: float) -> bool:
        """Fits with the base model partly in CPU memory (slower: weights cross the bus every step)."""
        return self.streamed_peak is not None and self.streamed_peak <= (card_gb - CARD_RESERVE_GB) * GIB

    def smallest_card_streamed(self) -> int | None:
        return next((gb for gb in CARDS_GB if self.fits_streamed(gb)), None)


def gpu_weight_dtype(model_config) -> torch.dtype:
    """The dtype ComfyUI stores the model's weights in on a recent NVIDIA GPU (fp16 SD UNets, bf16 DiTs)."""
    return model_config.supported_inference_dtypes[0]


def fake_model(model_config, dtype: torch.dtype):
    """A ModelPatcher around a fake BaseModel built from `model_config` (call inside HostFakeMode):
    ComfyUI's layers create their weights with torch.empty, so they come out fake."""
    import comfy.model_patcher

    config = object.__new__(type(model_config))  # a copy: set_inference_dtype changes it
    config.__dict__.update(model_config.__dict__)
    config.unet_config = dict(model_config.unet_config)
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@dataclass
class _Run:
    """What the trainer builds for a run, built the same way (trainer.TDFTTrainer._build_parts)."""
    patcher: object
    config: object
    trained: object
    optim: Optimization
    schedule: tdft.NoiseSchedule
    grid: torch.Tensor
    saved_copies: bool = False  # autograd keeps copies of what it saves (autograd_safety.py)


def build_run(patcher, config) -> _Run:
    """`config`: the run's config; the family's recipe and layer names are filled in as the trainer does."""
    config = _as_the_trainer_runs_it(config, patcher.model)
    trained = make_trained(patcher, config)
    # 8-bit AdamW (bitsandbytes, CUDA only) is traced as float32 AdamW and corrected (_eight_bit_saving)
    traced = dataclasses.replace(config, optimizer="adamw")
    optim = Optimization(trained.parameters(), traced, torch.device("cpu"), lambda msg: None)
    optim.optimizer.param_groups[0]["foreach"] = True  # the GPU's multi-tensor path, with its temporaries
    schedule = tdft.NoiseSchedule.from_model_sampling(patcher.model.model_sampling)
    return _Run(patcher, config, trained, optim, schedule, tdft.ddim_grid(schedule.T, config.grid_size))


def steady_state(run: _Run) -> None:
    """The optimizer state a run holds from its second step on (and, with accumulation, the gradients
    of the earlier micro-batches)."""
    params = run.trained.parameters()
    for p in params:
        p.grad = torch.zeros_like(p)
    run.optim.optimizer.step()
    if run.config.grad_accum == 1:
        run.optim.zero_grad()
    else:
        for p in params:
            p.grad.zero_()


def micro_batch(run: _Run, cond: dict, latent_shape, on_phase=lambda name: None):
    """One micro-batch of TDFT (as trainer._micro_batch, image mode): noised starts from latents, the
    teacher rollout and the student forward and backward; returns the trace."""
    c = run.config
    rng = ItemRandom(c.seed, 0, 0, range(c.batch_size))
    conds = tdft.concat_conds([cond] * c.batch_size)
    x0 = torch.zeros((c.batch_size,) + tuple(latent_shape))

    def denoiser(forward, phase):
        def denoise(x, t, inputs):
            on_phase(phase)
            with run.optim.autocast(), saved_tensor_copies(run.saved_copies):
                return forward(x, run.schedule.sigma(t, device=x.device), inputs).float()
        return denoise

    with run.trained.active(), gradient_checkpointing(run.trained.student_diffusion_model, c.gradient_checkpointing):
        start = tdft.noised_start(run.schedule, run.grid, x0, conds, rng, c.truncation_steps)
        trace = tdft.tdft_step(denoiser(run.trained.student_forward, "student forward"),
                               denoiser(run.trained.teacher_forward, "teacher rollout"), run.schedule, run.grid,
                               start, conds, rng, w=c.corruption_guidance, loss=c.loss, huber_c=c.huber_c)
        on_phase("student backward")
        run.optim.backward(trace.loss)
    return trace


class _Phases:
    """Follows the step's phases: the memory tracker learns which one is running, and the FLOP
    counter's total is split between the teacher and the student."""

    def __init__(self, tracker: MemoryTracker, counter: FlopTally):
        self.tracker, self.counter = tracker, counter
        self.flop = {"teacher": 0, "student": 0}
        self._mark = counter.total

    def __call__(self, name: str) -> None:
        self._close()
        self.tracker.phase = name

    def _close(self) -> None:
        total = self.counter.total
        who = "teacher" if self.tracker.phase.startswith("teacher") else "student"
        self.flop[who] += total - self._mark
        self._mark = total

    def finish(self) -> None:
        self._close()

    def restart(self) -> None:
        self.flop, self._mark = {"teacher": 0, "student": 0}, self.counter.total
        self.tracker.reset_peak()


def _probed_micro_batch(run: _Run, cond: dict, latent_shape, phases: _Phases) -> None:
    """micro_batch; for a model whose blocks update tensors in place, again with the saved-tensor
    copies the trainer then switches on (its probe: trainer._probe_in_place_updates)."""
    try:
        micro_batch(run, cond, latent_shape, phases)
        return
    except RuntimeError as e:
        if INPLACE_ERROR not in str(e):
            raise
    run.saved_copies = True
    phases.restart()
    micro_batch(run, cond, latent_shape, phases)


def _bytes(tensors, keys=None) -> int:
    """Bytes of the tensors' storages (each once), only those in `keys` if given."""
    seen = {}
    for t in tensors:
        if t is not None:
            key = MemoryTracker.key(t)
            if keys is None or key in keys:
                seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _weight_tensors(run: _Run) -> dict[str, list]:
    base = run.patcher.model.diffusion_model
    trainable = run.trained.parameters()
    teacher = getattr(run.trained.teacher, "module", None)
    return {"base weights": list(base.parameters()) + list(base.buffers()),
            "trainable parameters": trainable,
            "teacher copy (EMA)": list(teacher.parameters()) if teacher is not None else []}


def _optimizer_tensors(optim: Optimization) -> list:
    return [v for state in optim.optimizer.state.values() for v in state.values()
            if torch.is_tensor(v) and v.numel() > 1]


def _split_peak(run: _Run, tracker: MemoryTracker, grads: list) -> dict[str, int]:
    """What the peak holds, by kind; what is not a weight, gradient or optimizer state is activations
    and temporaries (of the forward/backward pass or of the optimizer step)."""
    keys, parts, counted = tracker.at_peak, {}, set()
    kinds = {**_weight_tensors(run), "gradients": grads, "optimizer state": _optimizer_tensors(run.optim)}
    for kind, tensors in kinds.items():
        fresh = [t for t in tensors if t is not None and MemoryTracker.key(t) not in counted]
        parts[kind] = _bytes(fresh, keys)
        counted |= {MemoryTracker.key(t) for t in fresh}
    parts["activations and temporaries"] = tracker.peak - sum(parts.values())
    return parts


def _eight_bit_saving(run: _Run, parts: dict) -> int:
    """8-bit AdamW keeps its two moments in 1 byte each instead of 4 (the trace used float32 AdamW)."""
    if run.config.optimizer != "adamw8bit":
        return 0
    saving = parts["optimizer state"] * 3 // 4
    parts["optimizer state"] -= saving
    return saving


def _streamed_peak(run: _Run, peak: int, parts: dict) -> int | None:
    """The peak of a LoRA run whose frozen base streams from CPU memory (Plan.streamed_peak)."""
    if run.config.mode != "lora":
        return None  # full fine-tuning updates every weight: they stay on the device
    base = run.patcher.model.diffusion_model
    layers = [m for m in base.modules() if getattr(m, "weight", None) is not None and not list(m.children())]
    largest = max((_bytes([m.weight, getattr(m, "bias", None)]) for m in layers), default=0)
    return peak - parts["base weights"] + 2 * largest


@dataclass
class TextShape:
    """What the text encoder hands the model, for planning without one: [1, tokens, dim] embeddings,
    an optional pooled vector (None: an encoder that hands the model `pooled_output=None`, as Chroma's
    T5) and an optional attention mask (LTXV reads T5's)."""
    tokens: int
    dim: int
    pooled: int | None = 0
    mask: bool = False

    def conditioning(self) -> list:
        extras = {}
        if self.pooled is None:
            extras["pooled_output"] = None
        elif self.pooled:
            extras["pooled_output"] = torch.zeros(1, self.pooled)
        if self.mask:
            extras["attention_mask"] = torch.ones(1, self.tokens, dtype=torch.long)  # as T5 hands it over
        return [[torch.zeros(1, self.tokens, self.dim), extras]]


def _model_inputs(base_model, text, latent_shape) -> dict:
    """The batch-1 conditioning dict of the model: `text` is a CONDITIONING (from the run's CLIP) or
    a TextShape; through ComfyUI's own extra_conds either way (conditioning.TextEncoder)."""
    from .conditioning import TextEncoder

    conditioning = text.conditioning() if isinstance(text, TextShape) else text
    return TextEncoder(base_model, None, latent_shape).model_inputs(conditioning).as_cond()


def _as_the_trainer_runs_it(config, base_model):
    """The family's recipe where the config leaves it open, and its layer names (both idempotent)."""
    from .families import family_of
    from .recipes import resolve
    from .trainer import family_settings

    family = family_of(base_model)
    return family_settings(resolve(config, family, base_model), family)


def _trace(model_config, config, text, latent_shape, dtype) -> tuple[dict, str]:
    """One fake optimizer step; the raw figures."""
    tracker, counter = MemoryTracker(), FlopTally()
    with target_attention() as attention, fake_module_casts(), HostFakeMode(tracker, counter), \
            torch.inference_mode(False):
        run = build_run(fake_model(model_config, dtype), config)
        config = run.config
        cond = _model_inputs(run.patcher.model, text, latent_shape)
        steady_state(run)
        phases = _Phases(tracker, counter)
        tracker.reset_peak()
        _probed_micro_batch(run, cond, latent_shape, phases)
        grads = [p.grad for p in run.trained.parameters()]
        phases("optimizer step")
        run.optim.step()
        run.trained.update_teacher()
        phases.finish()
        parts = _split_peak(run, tracker, grads)
        saving = _eight_bit_saving(run, parts)
        weights = {}
        for t in {MemoryTracker.key(t): t for ts in _weight_tensors(run).values() for t in ts}.values():
            name = str(t.dtype).removeprefix("torch.")
            weights[name] = weights.get(name, 0) + t.untyped_storage().nbytes()
        raw = dict(peak=tracker.peak - saving, peak_phase=tracker.peak_phase, parts=parts, weights_by_dtype=weights,
                   streamed_peak=_streamed_peak(run, tracker.peak - saving, parts),
                   trainable_params=sum(p.numel() for p in run.trained.parameters()),
                   teacher_flop=phases.flop["teacher"] * config.grad_accum,
                   student_flop=phases.flop["student"] * config.grad_accum,
                   notes=[SAVED_COPIES_NOTE] if run.saved_copies else [])
    return raw, attention


def plan(model_config, config, text, latent_shape, dtype=None, name: str = "", both_checkpointing=False) -> Plan:
    """The plan of a run of `config` (with the family's choices made: trainer.family_settings) on the
    model of `model_config`, stored in `dtype` (default: as ComfyUI stores it on a GPU), with latents
    of `latent_shape` (one item, no batch axis). both_checkpointing: also trace the step with gradient
    checkpointing switched, for its peak."""
    started = time.perf_counter()
    dtype = dtype or gpu_weight_dtype(model_config)
    raw, attention = _trace(model_config, config, text, latent_shape, dtype)
    other = None
    if both_checkpointing:
        flipped = dataclasses.replace(config, gradient_checkpointing=not config.gradient_checkpointing)
        other = _trace(model_config, flipped, text, latent_shape, dtype)[0]["peak"]
    return Plan(model=name or type(model_config).__name__, weight_dtype=str(dtype).removeprefix("torch."),
                attention=attention, checkpointing=config.gradient_checkpointing, other_checkpointing_peak=other,
                seconds=time.perf_counter() - started, **raw)


def plan_for_model(patcher, clip, vae, config, log=lambda message: None, both_checkpointing=True) -> Plan:
    """The plan of training `patcher` (a loaded ComfyUI MODEL) with its CLIP and VAE under `config`,
    as the trainer would run it: the family's LoRA layers and precision, the latent shape the data
    will be encoded to, the conditioning the CLIP makes of the empty prompt."""
    from .families import family_of, makes_video
    from .geometry import latent_geometry
    from .trainer import family_settings

    base = patcher.model
    family = family_of(base)
    from .recipes import resolve

    config = resolve(config, family, base)  # idempotent: a resolved config stays as it is
    run_config = family_settings(config, family)
    latent_shape = latent_geometry(base, vae, makes_video(family, base), config.frames).shape(config.resolution)
    if clip is not None:
        from .conditioning import TextEncoder

        text = TextEncoder(base, clip, latent_shape).conditioning("")
    else:
        text = TextShape(77, int(base.model_config.unet_config.get("context_dim") or 768))
    stored = base.get_dtype()
    dtype = stored if stored != torch.float32 else gpu_weight_dtype(base.model_config)
    log(f"planning one training step of {family.name} on fake tensors ...")
    return plan(base.model_config, run_config, text, latent_shape, dtype, name=type(base.model_config).__name__,
                both_checkpointing=both_checkpointing)


def _gb(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GB"


def format_plan(p: Plan) -> str:
    """The plan as the CLI's --plan and the training node print it."""
    rows = [f"Plan: one optimizer step of {p.model} (weights {p.weight_dtype}; {p.trainable_params / 1e6:.1f} M "
            f"trainable parameters; attention: {p.attention})",
            f"  peak accelerator memory    {_gb(p.peak)}  (during the {p.peak_phase})"]
    rows += [f"    {kind:<26} {_gb(n)}" for kind, n in p.parts.items()]
    rows += ["  weights by dtype           " + ", ".join(f"{d} {_gb(n)}" for d, n in p.weights_by_dtype.items())]
    if p.other_checkpointing_peak is not None:
        label = "without" if p.checkpointing else "with"
        rows.append(f"  peak {label} gradient checkpointing: {_gb(p.other_checkpointing_peak)}")
    rows.append(f"  compute per optimizer step {p.flop / 1e12:.2f} TFLOP (teacher {p.teacher_flop / 1e12:.2f}, "
                f"student {p.student_flop / 1e12:.2f})")
    fits = "  ".join(f"{gb} GB {'yes' if p.fits(gb) else 'no'}" for gb in CARDS_GB)
    rows.append(f"  fits (keeping {CARD_RESERVE_GB:g} GB for CUDA): {fits}")
    if p.streamed_peak is not None and p.smallest_card() != p.smallest_card_streamed():
        card = p.smallest_card_streamed()
        rows.append(f"  with the base model partly in CPU memory (ComfyUI's partial loading; slower): at least "
                    f"{_gb(p.streamed_peak)}, fits {f'{card} GB' if card else 'no card listed'}")
    rows += [f"  note: {note}" for note in p.notes]
    rows.append(f"  planned in {p.seconds:.1f} s on this machine's CPU, nothing allocated")
    return "\n".join(rows)
