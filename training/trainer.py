"""TDFT trainer: puts the parts together and runs the loop. The node and the CLI drive it through
`train` / `train_step` / `save_checkpoint` / `load_checkpoint` / `export` / `negative_model`.

The parts, each chosen once at construction:
  trained     what is trained: all weights or a LoRA, with its teacher (trained.py)
  encoded     the data, encoded once (encoding.py)
  starts      where rollouts start: real latents or the data-free trajectory buffer (starts.py)
  optim       AdamW, schedule, mixed precision (optimization.py)
  world       one process or one of a torchrun job (distributed.py)
Each step runs `tdft.tdft_step` — the one composition of the algorithm — per micro-batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, export, tdft
from .distributed import LocalWorld
from .draws import ItemRandom
from .conditioning import TextEncoder, forward_by_constants
from .encoding import LATENTS, encode_data
from .autograd_safety import needs_saved_copies, saved_tensor_copies
from .errors import (DataError, NonFiniteLoss, OutOfMemory, ResumeMismatch, TrainingCancelled, UnsupportedModel,
                     comfy_interrupt, out_of_memory)
from .families import family_of, makes_video
from .geometry import latent_geometry
from .grad_checkpointing import gradient_checkpointing
from .identity import model_identity
from .optimization import Optimization
from .recipes import describe_recipe, resolve
from .signals import signals_deferred
from .starts import make_starts
from .streaming import recast_in_backward
from .trained import make_trained

_log = logging.getLogger("comfy_selfnpo.training")


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    teacher_s: float
    student_s: float


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0


def peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS


class _TimedDenoiser:
    """A denoiser that adds the wall time of its calls to `seconds` (synchronising the device)."""

    def __init__(self, denoise, sync):
        self.denoise, self.sync, self.seconds = denoise, sync, 0.0

    def __call__(self, x, t, cond):
        start = time.perf_counter()
        out = self.denoise(x, t, cond)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out


class _StudentModule(torch.nn.Module):
    """The trainable parameters and the student's forward as one module, for DistributedDataParallel."""

    def __init__(self, trained):
        super().__init__()
        self.trainable = trained.module
        self._trained = trained  # not a Module: its parameters are registered once, above

    def forward(self, x, sigma, cond):
        return self._trained.student_forward(x, sigma, cond)


def training_patcher(model, log):
    """The MODEL to train from. Under dynamic VRAM (newer ComfyUI's default) weights are streamed on
    demand and LoRA patches applied at cast time; where core offers a non-dynamic clone
    (`clone(disable_dynamic=True)`), training uses it, so weights stay put while the trainer hooks
    and copies them (the full copy reads patched weights on the side either way)."""
    if not model.is_dynamic():
        return model
    try:
        clone = model.clone(disable_dynamic=True)
    except TypeError:  # a core without the option: train the dynamic model itself
        log("the MODEL uses dynamic VRAM and this ComfyUI offers no non-dynamic clone; training it as it is")
        return model
    except RuntimeError as e:
        # v0.38: "Cannot create non-dynamic delegate: cached_patcher_init is not initialized." -- the
        # loader (a custom one) registered no way to reload the model non-dynamically
        if "cached_patcher_init" not in str(e):
            raise
        log("the MODEL uses dynamic VRAM and its loader cannot give a non-dynamic copy; training it as it is")
        return model
    log("the MODEL uses dynamic VRAM: training a non-dynamic clone of it")
    return clone


def _check_model(patcher):
    """The model's family; UnsupportedModel for what TDFT cannot train."""
    from ..npo.guidance import GUIDANCE_DISTILLED_WHY, is_guidance_distilled

    if not hasattr(patcher.model, "diffusion_model"):
        raise UnsupportedModel("the MODEL has no diffusion_model; TDFT trains diffusion UNets/DiTs")
    if is_guidance_distilled(patcher):
        raise UnsupportedModel(f"cannot train a Self-NPO negative for {type(patcher.model.model_config).__name__}: "
                               f"{GUIDANCE_DISTILLED_WHY}.")
    return family_of(patcher.model)


def family_settings(config, family):
    """The resolved config with the family's layer names: "attn"/"attn+ff" as the family's regex."""
    return dataclasses.replace(config, lora_targets=family.lora_targets(config.lora_targets))


def _check_inputs(data, clip) -> None:
    if type(data) not in LATENTS:
        raise DataError(f"data must be one of {', '.join(k.__name__ for k in LATENTS)}, got {type(data).__name__}")
    if clip is None:
        raise DataError("training needs the CLIP of the checkpoint to encode captions")


class TDFTTrainer:
    """See the module docstring."""

    def __init__(self, model, clip, vae, data, config, work_dir, device=None, log=None, world=None):
        import comfy.model_management as mm

        config.validate()
        _check_inputs(data, clip)
        self.data, self.clip, self.vae = data, clip, vae
        self.work_dir, self.log = Path(work_dir), log or _log.info
        self.world = world or LocalWorld()
        model = training_patcher(model, self.log)
        self.base_patcher, self.base_model = model, model.model
        self.family = _check_model(model)
        self.config = config = resolve(config, self.family, self.base_model)  # the family's recipe where "auto"
        self.run_config = family_settings(config, self.family)  # "attn" as this family's layers
        self.log(describe_recipe(config, self.family))
        self.schedule = tdft.NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
        if self.schedule.T < config.grid_size:
            raise UnsupportedModel(f"the model has {self.schedule.T} timesteps, fewer than grid_size")
        self.grid = tdft.ddim_grid(self.schedule.T, config.grid_size)
        self.levels = tdft.noise_levels(self.schedule, self.grid, config.expert, config.expert_boundary)
        self.device = torch.device(device) if device is not None else mm.get_torch_device()
        self.step, self.losses = 0, []
        self.model_name = ""  # the base model's file name, for the exported files' metadata (front ends set it)
        self.saved_step = None  # the step of the newest checkpoint written or resumed (every process knows it)
        with torch.inference_mode(False):
            self.base_hash = model_identity(model)
            self._load_base()
            self._build_parts(data, clip, vae)

    def _build_parts(self, data, clip, vae) -> None:
        import comfy.model_management as mm

        config = self.run_config
        self.trained = make_trained(self.base_patcher, config)
        self.geometry = latent_geometry(self.base_model, vae, makes_video(self.family, self.base_model), config.frames)
        self.encoded = encode_data(data, self.base_model, clip, vae, self.geometry, config.resolution, config.fps,
                                   config.uncond, self.work_dir / "cache", self.log, config.crop, config.seed)
        mm.soft_empty_cache()
        self.starts = make_starts(self.encoded, self.schedule, self.grid, config, self.world, self.device, self.levels)
        self._load_base(extra_bytes=3 * self.trained.own_bytes())  # copies + AdamW's two moments
        self.trained.to(self.device)
        self.optim = Optimization(self.trained.parameters(), config, self.device, self.log)
        self.saved_copies = False
        self.saved_copies = self._probe_in_place_updates()
        self.student = self.world.wrap(_StudentModule(self.trained), self.trained.may_skip_parameters)

    def _probe_in_place_updates(self) -> bool:
        """One student forward/backward on a batch of 1: does this model update tensors autograd
        needs in place? Then every step keeps copies of what it saves (autograd_safety.py)."""
        x = torch.randn((1,) + tuple(self.encoded.latent_shape), generator=torch.Generator().manual_seed(0))
        t = self.grid[len(self.grid) // 2].view(1)
        cond = self.encoded.conds([0], self.device) if self.encoded.item_conds else self.encoded.unconds(1, self.device)
        student = self._denoiser(self.trained.student_forward)  # not through DDP: a failed backward would upset it

        def forward_and_loss():
            return student(x.to(self.device), t.to(self.device), cond).float().square().mean()

        with self._student_passes():
            needed = needs_saved_copies(forward_and_loss)
        self.optim.zero_grad()
        if needed:
            self.log(f"{self.family.name}: its blocks update tensors in place; autograd keeps copies of what it saves")
        return needed

    # ------------------------------------------------------------------ pieces

    def _load_base(self, extra_bytes: int = 0) -> None:
        import comfy.model_management as mm

        if self.device == mm.get_torch_device():
            # never trained itself, the base may stay partly in CPU memory when the GPU is too small
            # (ComfyUI streams those layers in; streaming.py keeps the backward pass exact)
            mm.load_models_gpu([self.base_patcher], memory_required=extra_bytes, force_full_load=False)
        else:
            self.base_model.to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _denoiser(self, forward):
        """forward(x, σ, inputs) -> a tdft Denoiser over timesteps, in the run's autocast, float32 out
        (rows whose plain inputs differ, e.g. Lumina 2's token counts, in separate calls)."""
        def denoise(x, t, cond):
            sigma = self.schedule.sigma(t, device=x.device)
            with self.optim.autocast(), saved_tensor_copies(self.saved_copies):
                return forward_by_constants(forward, x, sigma, cond).float()
        return denoise

    def _stopper(self, should_stop):
        """should_stop agreed by every process (any one asking stops all, at the same step)."""
        return lambda: self.world.any(bool(should_stop is not None and should_stop()))

    # ------------------------------------------------------------------ one step

    def _micro_batch(self, micro: int, teacher) -> float:
        c = self.config
        rng = ItemRandom(c.seed, self.step, micro, self.world.items(c.batch_size))
        start = self.starts.next_batch(rng, self.step, micro)
        with self.world.accumulating(self.student, last=micro == c.grad_accum - 1):
            uncond = start.uncond if start.uncond is not None else self.encoded.unconds(len(rng), self.device)
            trace = tdft.tdft_step(self._denoiser(self.student), teacher, self.schedule, self.grid, start, uncond, rng,
                                   w=c.corruption_guidance, loss=c.loss, huber_c=c.huber_c, t_max=self.levels.t_max)
            if self.world.any(not bool(torch.isfinite(trace.loss))):
                raise NonFiniteLoss(self._non_finite_message(trace.loss.item()))
            self.optim.backward(trace.loss)
        self.starts.after_rollout(trace, self.step, micro)
        return float(trace.loss.detach())

    def _non_finite_message(self, loss: float) -> str:
        if self.saved_step is not None:
            kept = (f"nothing was saved over the last good checkpoint ({self.work_dir / 'checkpoint'}, step "
                    f"{self.saved_step}); lower the learning rate (or use mixed_precision='no'/'bf16') and "
                    "resume from it")
        else:
            kept = ("no checkpoint had been saved yet; lower the learning rate (or use mixed_precision='no'/"
                    "'bf16') and start again")
        return f"the TDFT loss became {loss} at step {self.step + 1}; {kept}."

    def _accumulate(self, teacher) -> list[float]:
        with self._student_passes():
            return [self._micro_batch(micro, teacher) for micro in range(self.config.grad_accum)]

    @contextlib.contextmanager
    def _student_passes(self):
        """Where student forwards and backwards run: the trained weights in place, streamed base layers
        recomputed in the backward pass (streaming.py), blocks checkpointed if asked."""
        with self.trained.active(), recast_in_backward(self.trained.streamed_student_layers(self.device)), \
                gradient_checkpointing(self.trained.student_diffusion_model, self.config.gradient_checkpointing):
            yield

    def _rewind(self, position: dict) -> None:
        """Undo a failed step: no half-accumulated gradients, the data position before it."""
        import comfy.model_management as mm

        self.optim.zero_grad()
        self.starts.load_state_dict(position)
        mm.soft_empty_cache()

    def train_step(self) -> StepResult:
        """One optimizer step (grad_accum micro-batches), then the teacher update. A step that fails
        (non-finite loss, out of memory, interrupt) leaves the run as it was before it."""
        with torch.inference_mode(False):
            self._load_base()
            started = time.perf_counter()
            teacher = _TimedDenoiser(self._denoiser(self.trained.teacher_forward), self._sync)
            with self.trained.active():
                self.starts.prepare(teacher)
            teacher.seconds = 0.0
            before = self.starts.state_dict()
            try:
                losses = self._accumulate(teacher)
            except (NonFiniteLoss, KeyboardInterrupt, comfy_interrupt()):
                self._rewind(before)
                raise
            except torch.OutOfMemoryError as e:
                self._rewind(before)
                raise out_of_memory(e, self.step) from e
            with signals_deferred():  # the step is applied whole or not at all
                lr = self.optim.step()
                self.trained.update_teacher()
                self._sync()
                self.step += 1
                loss = self.world.mean(sum(losses) / len(losses))
                self.losses.append(loss)
            total = time.perf_counter() - started
            return StepResult(step=self.step, loss=loss, lr=lr, teacher_s=teacher.seconds,
                              student_s=total - teacher.seconds)

    # ------------------------------------------------------------------ the loop

    def _cancelled(self, reason: str) -> TrainingCancelled:
        self.save_checkpoint()
        self.world.barrier()  # every process agreed to stop here: leave together, the checkpoint on disk
        path = self.work_dir / "checkpoint"
        return TrainingCancelled(f"{reason} at step {self.step}; resumable checkpoint saved to {path}",
                                 checkpoint_path=path, step=self.step)

    def _prepare_starts(self, stop, progress) -> None:
        teacher = self._denoiser(self.trained.teacher_forward)
        try:
            with self.trained.active():
                self.starts.prepare(teacher, should_stop=stop, progress=progress)
        except TrainingCancelled:
            raise self._cancelled("training cancelled while preparing the data") from None

    def train(self, steps=None, on_step=None, should_stop=None, on_save=None, on_prepare=None) -> TrainResult:
        """Run until config.steps (or `steps` more). Every `save_every` steps a resumable checkpoint
        (then on_save(step, folder)). should_stop() ends the run at the next step boundary with a
        checkpoint (TrainingCancelled); so do ComfyUI's cancel raised inside a forward pass
        (TrainingCancelled, the state after the last whole step), Ctrl+C (KeyboardInterrupt, re-raised)
        and running out of memory (OutOfMemory, with the checkpoint of the state before the failed step)."""
        target = self.config.steps if steps is None else self.step + int(steps)
        start, losses, stop = time.perf_counter(), [], self._stopper(should_stop)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with torch.inference_mode(False):
                self._load_base()
                self._prepare_starts(stop, on_prepare)
                while self.step < target:
                    if stop():
                        raise self._cancelled("training cancelled")
                    result = self.train_step()
                    losses.append(result.loss)
                    if on_step is not None:
                        on_step(result)
                    if self.config.save_every and self.step % self.config.save_every == 0:
                        folder = self.save_checkpoint()
                        if on_save is not None:
                            on_save(self.step, folder)
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise
        except comfy_interrupt() as e:  # cancel in ComfyUI, raised inside a forward: the last whole step is kept
            raise self._cancelled("training cancelled") from e
        except OutOfMemory as e:
            raise out_of_memory(e, self.step, checkpoint_path=self.save_checkpoint()) from e
        return TrainResult(steps=self.step, losses=losses, seconds=time.perf_counter() - start,
                           peak_memory_bytes=peak_memory(self.device))

    # ------------------------------------------------------------------ checkpoints

    def identity(self) -> checkpoint.RunIdentity:
        return checkpoint.RunIdentity(
            config=self.config.to_dict(), base_model_hash=self.base_hash, data_kind=self.starts.kind,
            data_fingerprint=self.data.fingerprint(), global_batch=self.config.batch_size * self.world.size,
            processes=self.world.size)

    def save_checkpoint(self, path=None) -> Path | None:
        """Atomic resumable checkpoint (a folder holding state.pt), written by the main process only
        (every process holds the same state). Returns the folder (None on the other processes)."""
        folder = Path(path) if path is not None else self.work_dir / "checkpoint"
        with torch.inference_mode(False), signals_deferred():
            written = self.world.main_only(lambda: checkpoint.write(folder, self.identity(), {
                "step": self.step, "losses": list(self.losses), "trained": self.trained.state_dict(),
                "optimization": self.optim.state_dict(), "starts": self.starts.state_dict()}))
        if path is None:
            self.saved_step = self.step
        return written

    def load_checkpoint(self, path, allow_data_change: bool = False) -> list[str]:
        """Restore everything saved by save_checkpoint (read by the main process, sent to the others).
        ResumeMismatch names every setting this run changes that must stay fixed; what may change
        (checkpoint.MAY_CHANGE) applies from here on, and is returned as one line per change.
        UnusableCheckpoint: missing, damaged or of another format."""
        with torch.inference_mode(False):
            state = self.world.from_main(lambda: checkpoint.read(path))
            try:
                notices = checkpoint.check_resumable(state["identity"], self.identity(), allow_data_change)
            except (KeyError, TypeError) as e:
                raise checkpoint.damaged(path, f"its identity is incomplete ({type(e).__name__}: {e})") from e
            try:
                self.trained.load_state_dict(state["trained"])
                self.optim.load_state_dict(state["optimization"])
                self.starts.load_state_dict(state["starts"])
                self.step, self.losses = int(state["step"]), list(state["losses"])
                self.saved_step = self.step
            except ResumeMismatch:
                raise
            except (KeyError, TypeError, ValueError, RuntimeError) as e:  # missing or malformed parts
                raise checkpoint.damaged(path, f"{type(e).__name__}: {e}") from e
        return notices

    # ------------------------------------------------------------------ outputs

    def export_state_dict(self, format: str | None = None) -> dict[str, torch.Tensor]:
        return export.export_tensors(self.trained, self.base_model, format or self.config.output_format)

    def metadata(self, fmt: str, name: str = "") -> dict[str, str]:
        return export.metadata(fmt, self.base_model, self.config, self.base_hash, self.step, self.starts.kind,
                               name=name, model_name=self.model_name)

    def export(self, path, format=None) -> Path:
        fmt = format or self.config.output_format
        return export.write(path, self.trained, self.base_model, fmt, self.metadata(fmt, Path(path).stem))

    def negative_model(self):
        """A clone of the base MODEL with the trained change as weight patches."""
        return export.negative_model(self.base_patcher, self.trained)

    def to_model_cond(self, cond) -> dict:
        """A prompt string or a ComfyUI CONDITIONING -> the tensors apply_model takes."""
        if isinstance(cond, dict):
            return cond
        text = TextEncoder(self.base_model, self.clip, self.encoded.latent_shape)
        inputs = text.prompt(cond) if isinstance(cond, str) else text.model_inputs(cond)
        return inputs.as_cond()

    def predict_x0(self, x, sigma, cond):
        """Student x0-prediction at noise level sigma (float or per-row tensor) for a prompt, a
        CONDITIONING or a cond dict (`c_crossattn`, ...)."""
        with torch.inference_mode(False), torch.no_grad():
            self._load_base()
            c = self.to_model_cond(cond)
            if all(v.shape[0] == 1 for v in c.values() if torch.is_tensor(v)):
                c = tdft.concat_conds([c] * x.shape[0])  # one prompt for every row
            c = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in c.items()}
            x = x.to(self.device).float()
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(x.shape[0]).clone()
            with self.trained.active(), self.optim.autocast():
                return forward_by_constants(self.trained.student_forward, x, sigma, c).float()
