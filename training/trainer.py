"""TDFT trainer: owns the student, the teacher, the optimizer and the data; the node and the CLI
drive it through `train_step` / `train` / `export`. The per-step math lives in `tdft.py`.

What is trained never touches the caller's MODEL in place:
  * full mode: the student (and an EMA teacher) are separate float32 copies rebuilt from the model
    config and its state dict (ComfyUI models cannot be deep-copied); the frozen-base teacher is the
    loaded model itself, used without gradients;
  * LoRA mode: adapters hooked into the loaded model only while the trainer runs a forward; the
    frozen-base teacher is the same model with the adapter off.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import tdft
from .checkpoint import load_torch, save_safetensors, save_torch
from .config import TDFTConfig
from .data import EpochSampler, ImageCaptionFolder, LatentDataset, PromptList
from .ema import ema_update
from .errors import (DataError, NonFiniteLoss, OutOfMemory, ResumeMismatch,  # noqa: F401
                     TrainingCancelled, TrainingError, UnsupportedModel)
from .lora import LoRAAdapters, gradient_checkpointing

_log = logging.getLogger("comfy_selfnpo.training")


CHECKPOINT_FORMAT = "comfy_selfnpo.tdft_checkpoint"
CHECKPOINT_VERSION = 1
# Settings a resumed run may change: they do not alter the math of the remaining steps
# (gradient checkpointing gives identical gradients; tested), so e.g. a run that ran out of memory
# can resume with checkpointing switched on.
RESUMABLE_CHANGES = {"steps", "save_every", "output_format", "gradient_checkpointing"}


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


def _tensor_digest(h, name: str, t: torch.Tensor) -> None:
    """Feed name, shape, dtype and a fixed strided sample of values (up to 4096) into the hash:
    fast for multi-GB UNets and still changes when any layer's weights change."""
    flat = t.detach().reshape(-1)
    stride = max(1, flat.numel() // 4096)
    sample = flat[::stride][:4096].float().cpu()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(sample.numpy().tobytes())
    h.update(f"{float(flat.float().sum().cpu()):.6e}".encode())


def base_model_hash(model) -> str:
    """Stable hash of the base UNet weights (with the MODEL's weight patches applied, i.e. the model
    as it is wired into training). `model`: a ModelPatcher or BaseModel."""
    base = getattr(model, "model", model)
    if hasattr(model, "patches") and model.patches:
        import comfy.model_management
        comfy.model_management.load_models_gpu([model], force_full_load=True)
    h = hashlib.sha256()
    with torch.inference_mode(False), torch.no_grad():
        for name, t in sorted(base.diffusion_model.state_dict().items()):
            _tensor_digest(h, name, t)
    return h.hexdigest()[:32]


def _make_autograd_safe(module: torch.nn.Module) -> None:
    """Tensors created under torch.inference_mode() (ComfyUI loads models inside it) cannot be saved
    for backward. Swap such parameters/buffers for ordinary clones with identical values."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_inference():
                setattr(sub, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def _rebuild_float32(base_model, device):
    """An independent float32 copy of a ComfyUI BaseModel (copy.deepcopy fails on them): a new
    model built from a copy of its config, loaded with the (patched) state dict."""
    original = base_model.model_config
    config = object.__new__(type(original))  # copy.copy trips over the config's __getattr__
    config.__dict__.update(original.__dict__)
    config.unet_config = dict(config.unet_config)
    config.set_inference_dtype(torch.float32, None)
    try:
        copy_model = type(base_model)(config, model_type=base_model.model_type, device="cpu")
    except TypeError:
        sd = {f"model.diffusion_model.{k}": v for k, v in base_model.diffusion_model.state_dict().items()}
        copy_model = config.get_model(sd, "model.diffusion_model.", device="cpu")
    copy_model.concat_keys = getattr(base_model, "concat_keys", ())
    copy_model.model_sampling = base_model.model_sampling
    state = {k: v.detach().to("cpu", torch.float32) for k, v in base_model.diffusion_model.state_dict().items()}
    missing, unexpected = copy_model.diffusion_model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnsupportedModel(f"could not copy the model for training (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    copy_model.diffusion_model.to(device=device, dtype=torch.float32)
    return copy_model


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS


class TDFTTrainer:
    """See the module docstring. Use `train()` or `train_step()`."""

    def __init__(self, model, clip, vae, data, config: TDFTConfig, work_dir: str | Path,
                 device=None, log=None):
        import comfy.model_management as mm

        config.validate()
        if not isinstance(data, (ImageCaptionFolder, LatentDataset, PromptList)):
            raise DataError("data must be an ImageCaptionFolder, a LatentDataset or a PromptList, got "
                            f"{type(data).__name__}")
        if isinstance(data, ImageCaptionFolder) and vae is None:
            raise DataError("training on images needs the VAE of the checkpoint to encode them")
        if clip is None:
            raise DataError("training needs the CLIP of the checkpoint to encode captions")
        self.config, self.data, self.clip, self.vae = config, data, clip, vae
        self.work_dir = Path(work_dir)
        self.log = log or _log.info
        self.base_patcher = model
        self.base_model = model.model
        if not hasattr(self.base_model, "diffusion_model"):
            raise UnsupportedModel("the MODEL has no diffusion_model; TDFT trains diffusion UNets/DiTs")
        self.schedule = tdft.NoiseSchedule.from_model_sampling(model.get_model_object("model_sampling"))
        if self.schedule.T < config.grid_size:
            raise UnsupportedModel(f"the model has {self.schedule.T} timesteps, fewer than grid_size")
        self.grid = tdft.ddim_grid(self.schedule.T, config.grid_size)
        self.device = torch.device(device) if device is not None else mm.get_torch_device()
        self.step = 0
        self.losses: list[float] = []
        self.gen = torch.Generator().manual_seed(config.seed)
        self._prepared = False
        self.student_model = self.teacher_model = self.adapters = None
        with torch.inference_mode(False):
            self._load_base()
            self.base_hash = base_model_hash(self.base_model)
            if config.mode == "full":
                self.student_model = _rebuild_float32(self.base_model, "cpu")
                self.student_model.diffusion_model.requires_grad_(True).train()
                if config.teacher == "ema":
                    self.teacher_model = _rebuild_float32(self.base_model, "cpu")
                    self.teacher_model.diffusion_model.requires_grad_(False)
            else:
                _make_autograd_safe(self.base_model.diffusion_model)  # its weights join the graph
                self.adapters = LoRAAdapters(self.base_model.diffusion_model, config.lora_targets,
                                             config.lora_rank, config.lora_alpha, config.seed,
                                             with_ema=config.teacher == "ema")

    # ------------------------------------------------------------------ setup

    def _load_base(self, extra_bytes: int = 0):
        import comfy.model_management as mm
        if self.device == mm.get_torch_device():
            mm.load_models_gpu([self.base_patcher], memory_required=extra_bytes, force_full_load=True)
        else:
            self.base_model.to(self.device)

    def _trainable(self) -> list[torch.nn.Parameter]:
        if self.adapters is not None:
            return self.adapters.trainable_parameters()
        return list(self.student_model.diffusion_model.parameters())

    def _own_bytes(self) -> int:
        mods = [m.diffusion_model for m in (self.student_model, self.teacher_model) if m is not None]
        if self.adapters is not None:
            mods.append(self.adapters)
        return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())

    def _prepare(self) -> None:
        """Encode the data (once, cached), put every model on the device, build the optimizer."""
        if self._prepared:
            return
        self._encode_data()
        self._load_base(extra_bytes=3 * self._own_bytes())  # copies + AdamW's two moments
        for m in (self.student_model, self.teacher_model):
            if m is not None:
                m.diffusion_model.to(self.device)
        if self.adapters is not None:
            self.adapters.to(self.device)
        self._make_autocast()
        self.optimizer = self._make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = None
        if self.config.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self._prepared = True

    def _make_autocast(self):
        mp = self.config.mixed_precision
        self._amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)

    def _autocast(self):
        if self._amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def _make_optimizer(self):
        c = self.config
        kwargs = dict(lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                      weight_decay=c.weight_decay)
        if c.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
                return bnb.optim.AdamW8bit(self._trainable(), **kwargs)
            except Exception as e:  # not installed, or no GPU build
                msg = f"8-bit AdamW needs bitsandbytes ({type(e).__name__}: {e}); using plain AdamW"
                warnings.warn(msg)
                self.log(msg)
        return torch.optim.AdamW(self._trainable(), **kwargs)

    def _lr_factor(self, step: int) -> float:
        c = self.config
        warm = c.warmup_steps
        if c.lr_schedule == "constant":
            return 1.0
        if warm and step < warm:
            return (step + 1) / warm
        if c.lr_schedule == "warmup":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, c.steps - warm))  # cosine
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    # ------------------------------------------------------------------ data

    def _encode_text(self, text: str):
        tokens = self.clip.tokenize(text)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return cond.detach().float().cpu().clone(), (None if pooled is None else pooled.detach().float().cpu().clone())

    def _model_cond(self, cond, pooled, latent_hw) -> dict:
        """ComfyUI's own conditioning for this model (e.g. SDXL's size/pooled `y`)."""
        h, w = latent_hw
        ratio = self._downscale
        extra = self.base_model.extra_conds(
            cross_attn=cond, pooled_output=pooled, width=w * ratio, height=h * ratio,
            target_width=w * ratio, target_height=h * ratio, crop_w=0, crop_h=0,
            device=torch.device("cpu"), noise=torch.zeros((1, self._latent_channels, h, w)))
        out = {}
        for name, c in extra.items():
            value = c.cond
            if torch.is_tensor(value):
                out[name] = value.detach().float().cpu().clone()
        return out

    def _encode_data(self) -> None:
        import comfy.model_management as mm

        ratio = getattr(self.vae, "downscale_ratio", 8)
        self._downscale = ratio if isinstance(ratio, int) and ratio > 0 else 8  # video VAEs: a tuple
        self._latent_channels = int(self.base_model.latent_format.latent_channels)
        res = self.config.resolution
        with torch.no_grad():
            if isinstance(self.data, LatentDataset):
                self._latents = self.data.latents
                latent_hw = tuple(self._latents.shape[-2:])
            elif isinstance(self.data, ImageCaptionFolder):
                self._latents = self._encode_images()
                latent_hw = tuple(self._latents.shape[-2:])
            else:
                self._latents = None
                latent_hw = (res // self._downscale, res // self._downscale)
            self._latent_hw = latent_hw
            captions = self.data.captions
            cache: dict[str, dict] = {}
            self._item_conds = []
            for text in captions:
                if text not in cache:
                    cache[text] = self._model_cond(*self._encode_text(text), latent_hw)
                self._item_conds.append(cache[text])
            if self.config.uncond == "zeros":  # SDXL recipe: zeroed embeddings of the empty prompt
                cond, pooled = self._encode_text("")
                self._uncond = self._model_cond(torch.zeros_like(cond),
                                                None if pooled is None else torch.zeros_like(pooled), latent_hw)
            else:
                self._uncond = cache[""] if "" in cache else self._model_cond(*self._encode_text(""), latent_hw)
        mm.soft_empty_cache()
        if self._latents is not None:
            self.sampler = EpochSampler(len(self.data), self.config.seed)
            self.buffer = None
        else:
            from .trajectories import TrajectoryBuffer
            self.sampler = None
            self.buffer = TrajectoryBuffer(self.config.trajectory_buffer,
                                           (self._latent_channels,) + latent_hw, len(self.data),
                                           self.schedule, self.config.grid_size,
                                           self.config.truncation_steps)

    def _latent_cache_path(self) -> Path:
        h = hashlib.sha256(self.data.fingerprint().encode())
        h.update(self.base_model.latent_format.__class__.__name__.encode())
        try:
            sd = self.vae.first_stage_model.state_dict()
            for name in sorted(sd)[:8]:
                _tensor_digest(h, name, sd[name])
        except Exception:  # a VAE without first_stage_model: cache still keyed by the data
            pass
        return self.work_dir / "cache" / f"latents-{h.hexdigest()[:16]}.pt"

    def _encode_images(self) -> torch.Tensor:
        path = self._latent_cache_path()
        if path.is_file():
            cached = load_torch(path)
            if cached.shape[0] == len(self.data) and torch.isfinite(cached).all():
                self.log(f"using cached latents {path}")
                return cached
        latents = []
        for i in range(len(self.data)):
            image = self.data.load_image(i)[None]
            raw = self.vae.encode(image[..., :3])
            latents.append(self.base_model.process_latent_in(raw.float().cpu()).clone())
        latents = torch.cat(latents)
        save_torch(path, latents)
        self.log(f"encoded {len(latents)} images to latents {tuple(latents.shape[1:])}, cached at {path}")
        return latents

    def _conds(self, items) -> dict:
        return {k: v.to(self.device) for k, v in tdft.concat_conds([self._item_conds[i] for i in items]).items()}

    def _unconds(self, n: int) -> dict:
        return {k: v.to(self.device) for k, v in tdft.concat_conds([self._uncond] * n).items()}

    # ------------------------------------------------------------------ denoisers

    def _apply(self, base_model, x, t, cond):
        sigma = self.schedule.sigma(t, device=x.device)
        with self._autocast():
            return base_model.apply_model(x, sigma, **cond).float()

    def _student(self, x, t, cond):
        if self.adapters is not None:
            with self.adapters.use("student"):
                return self._apply(self.base_model, x, t, cond)
        return self._apply(self.student_model, x, t, cond)

    def _teacher(self, x, t, cond):
        if self.adapters is not None:
            with self.adapters.use("ema" if self.config.teacher == "ema" else "off"):
                return self._apply(self.base_model, x, t, cond)
        model = self.teacher_model if self.teacher_model is not None else self.base_model
        return self._apply(model, x, t, cond)

    def _attached(self):
        import contextlib
        if self.adapters is not None:
            return self.adapters.attached(self.base_model.diffusion_model)
        return contextlib.nullcontext()

    def _student_diffusion_model(self):
        return (self.base_model if self.adapters is not None else self.student_model).diffusion_model

    # ------------------------------------------------------------------ training

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _micro_batch(self):
        """Teacher rollout and student regression for one micro-batch. Returns (loss, t_teacher)."""
        c, B = self.config, self.config.batch_size
        t0 = time.perf_counter()
        if self.buffer is None:
            items = self.sampler.next_indices(B)
            x0 = self._latents[items].to(self.device)
            cond = self._conds(items)
            index, noise = tdft.draw_start(self.gen, B, c.grid_size, x0.shape)
            t_s = self.grid[index]
            x_s = tdft.noise_to(self.schedule, x0, t_s.to(self.device), noise.to(self.device))
            steps = c.truncation_steps
            rows = None
        else:
            if not self.buffer.initialized:
                self.buffer.initialize(self._teacher, lambda p: self._conds(p.tolist()), self._unconds,
                                       c.corruption_guidance, self.gen, self.device, max(B, 1))
            rows = self.buffer.take(B)
            items = self.buffer.prompt[rows].tolist()
            cond = self._conds(items)
            x_s = self.buffer.x[rows].to(self.device)
            index, steps = self.buffer.index[rows], self.buffer.next_steps[rows]
        roll = tdft.teacher_rollout(self._teacher, self.schedule, self.grid, x_s, index, steps,
                                    c.corruption_guidance, cond, self._unconds(B))
        self._sync()
        t1 = time.perf_counter()
        with gradient_checkpointing(self._student_diffusion_model(), c.gradient_checkpointing):
            t, x_t, pred, loss = tdft.student_regression(self._student, self.schedule, roll, cond,
                                                         self.gen, c.loss, c.huber_c)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"the TDFT loss became {loss.item()} at step {self.step + 1}; nothing was saved over "
                    f"the last good checkpoint ({self.work_dir / 'checkpoint'}). Lower the learning rate "
                    "(or use mixed_precision='no'/'bf16') and resume from that checkpoint.")
            scaled = loss / c.grad_accum
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        if rows is not None:
            self.buffer.store(rows, roll.x_e, roll.index_e, self.gen)
        self._sync()
        return float(loss.detach()), t1 - t0, time.perf_counter() - t1

    def _data_state(self) -> dict:
        """Position in the data: the epoch sampler (images) or the trajectory buffer (prompts)."""
        return self.sampler.state_dict() if self.sampler is not None else self.buffer.state_dict()

    def _draw_state(self):
        """RNG and data position at the start of a step (restored when the step fails)."""
        return self.gen.get_state(), self._data_state()

    def _restore_draw_state(self, state) -> None:
        rng, data = state
        self.gen.set_state(rng)
        if self.sampler is not None:
            self.sampler.load_state_dict(data)
        else:
            self.buffer.load_state_dict(data)

    def train_step(self) -> StepResult:
        """One optimizer step (grad_accum micro-batches), then the EMA teacher update."""
        with torch.inference_mode(False):
            self._prepare()
            self._load_base(extra_bytes=0)
            c = self.config
            params = self._trainable()
            losses, t_teacher, t_student = [], 0.0, 0.0
            self.optimizer.zero_grad(set_to_none=True)
            before = self._draw_state()  # a failed step leaves the run as it was before it
            with self._attached():
                try:
                    for _ in range(c.grad_accum):
                        loss, tt, ts = self._micro_batch()
                        losses.append(loss)
                        t_teacher += tt
                        t_student += ts
                except (NonFiniteLoss, KeyboardInterrupt):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._restore_draw_state(before)
                    raise
                except torch.OutOfMemoryError as e:
                    self.optimizer.zero_grad(set_to_none=True)
                    self._restore_draw_state(before)
                    import comfy.model_management as mm
                    mm.soft_empty_cache()
                    raise OutOfMemory(
                        f"out of memory in TDFT step {self.step + 1} (batch_size={c.batch_size}, "
                        f"resolution={c.resolution}, mode={c.mode}). Lower batch_size (raise grad_accum to "
                        "keep the effective batch), enable gradient_checkpointing, use mode='lora' or a "
                        "'lora-*' preset, then resume from the checkpoint saved now.") from e
            t2 = time.perf_counter()
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if c.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if c.teacher == "ema":
                if self.adapters is not None:
                    self.adapters.update_ema(c.ema_decay)
                else:
                    ema_update(list(self.teacher_model.diffusion_model.parameters()),
                               list(self.student_model.diffusion_model.parameters()), c.ema_decay)
            self._sync()
            t_student += time.perf_counter() - t2
            self.step += 1
            loss = sum(losses) / len(losses)
            self.losses.append(loss)
            return StepResult(step=self.step, loss=loss, lr=lr, teacher_s=t_teacher, student_s=t_student)

    def train(self, steps=None, on_step=None, should_stop=None) -> TrainResult:
        """Run until config.steps (or `steps` more). should_stop/cancel, NaN and
        out-of-memory behaviour: see TrainingCancelled, NonFiniteLoss and OutOfMemory below."""
        target = self.config.steps if steps is None else self.step + int(steps)
        start, losses = time.perf_counter(), []
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            with torch.inference_mode(False):
                while self.step < target:
                    if should_stop is not None and should_stop():
                        path = self.save_checkpoint()
                        raise TrainingCancelled(
                            f"training cancelled at step {self.step}; resumable checkpoint saved to {path}",
                            checkpoint_path=path, step=self.step)
                    result = self.train_step()
                    losses.append(result.loss)
                    if on_step is not None:
                        on_step(result)
                    if self.config.save_every and self.step % self.config.save_every == 0:
                        self.save_checkpoint()
        except (KeyboardInterrupt, OutOfMemory) as e:
            if self._prepared:
                path = self.save_checkpoint()
                if isinstance(e, OutOfMemory):
                    e.checkpoint_path = path
            raise
        return TrainResult(steps=self.step, losses=losses, seconds=time.perf_counter() - start,
                           peak_memory_bytes=_peak_memory(self.device))

    # ------------------------------------------------------------------ checkpoints

    def _default_checkpoint(self) -> Path:
        return self.work_dir / "checkpoint"

    @staticmethod
    def _state_file(path) -> Path:
        path = Path(path)
        return path if path.suffix in (".pt", ".pth") else path / "state.pt"

    @staticmethod
    def _cpu_copy(module: torch.nn.Module) -> dict:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def _teacher_state(self):
        if self.config.teacher != "ema":
            return None
        return self._cpu_copy(self.adapters.ema if self.adapters is not None else self.teacher_model.diffusion_model)

    def _trainable_state(self):
        return self._cpu_copy(self.adapters.layers if self.adapters is not None else self.student_model.diffusion_model)

    def save_checkpoint(self, path=None) -> Path:
        """Atomic resumable checkpoint (a folder holding state.pt). Returns the folder."""
        folder = Path(path) if path is not None else self._default_checkpoint()
        with torch.inference_mode(False):
            self._prepare()
            state = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "config": self.config.to_dict(), "base_model_hash": self.base_hash,
                "step": self.step, "losses": list(self.losses),
                "trainable": self._trainable_state(), "teacher": self._teacher_state(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "rng": self.gen.get_state(),
                "data": self._data_state(),
                "data_kind": "images" if self.sampler is not None else "prompts",
                "data_fingerprint": self.data.fingerprint(),
            }
            save_torch(self._state_file(folder), state)
        return folder

    def load_checkpoint(self, path) -> None:
        """Restore everything saved by save_checkpoint; ResumeMismatch names what differs."""
        file = self._state_file(path)
        if not file.is_file():
            raise ResumeMismatch(f"no TDFT checkpoint at {str(file)!r}")
        with torch.inference_mode(False):
            try:
                state = load_torch(file)
            except Exception as e:
                raise ResumeMismatch(f"{str(file)!r} is not a readable TDFT checkpoint: {e}") from e
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                raise ResumeMismatch(f"{str(file)!r} is not a comfy-selfnpo TDFT checkpoint")
            if state["base_model_hash"] != self.base_hash:
                raise ResumeMismatch(
                    f"the checkpoint was trained from another base model (hash {state['base_model_hash']}, "
                    f"this MODEL has {self.base_hash}); load the same checkpoint/LoRAs it was started with")
            saved, now = state["config"], self.config.to_dict()
            diffs = sorted(k for k in set(saved) | set(now)
                           if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
            if diffs:
                detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diffs)
                raise ResumeMismatch(f"the checkpoint used other hyper-parameters ({detail}); resume "
                                     "with the same settings or start a new run")
            kind = "prompts" if isinstance(self.data, PromptList) else "images"
            if state["data_kind"] != kind:
                raise ResumeMismatch(f"the checkpoint trained on {state['data_kind']}, this run on {kind}")
            self._prepare()
            if self.adapters is not None:
                self.adapters.layers.load_state_dict(state["trainable"])
                if state["teacher"] is not None:
                    self.adapters.ema.load_state_dict(state["teacher"])
            else:
                self.student_model.diffusion_model.load_state_dict(state["trainable"])
                if state["teacher"] is not None:
                    self.teacher_model.diffusion_model.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            self._restore_draw_state((state["rng"], state["data"]))
            self.step = int(state["step"])
            self.losses = list(state["losses"])

    # ------------------------------------------------------------------ outputs

    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """diffusion-model state-dict key -> trained minus base (float32, CPU)."""
        with torch.inference_mode(False), torch.no_grad():
            if self.adapters is not None:
                return {f"{n}.weight": d.cpu() for n, d in self.adapters.weight_deltas().items()}
            base = self.base_model.diffusion_model.state_dict()
            return {k: (v.detach().float().cpu() - base[k].detach().float().cpu())
                    for k, v in self.student_model.diffusion_model.state_dict().items()}

    def export_state_dict(self, format: str | None = None) -> dict[str, torch.Tensor]:
        fmt = format or self.config.output_format
        if fmt == "lora":
            if self.adapters is None:
                raise TrainingError("a full-mode run cannot be saved as a LoRA; use format 'offset' "
                                    "(exact) or 'unet'")
            with torch.inference_mode(False):
                return self.adapters.kohya_state_dict(self.base_model)
        deltas = self.weight_deltas()
        if fmt == "offset":  # ComfyUI LoraSave full_diff layout: <key>.diff / <key>.diff_b
            out = {}
            for k, d in deltas.items():
                if k.endswith(".weight"):
                    out[f"diffusion_model.{k[:-len('.weight')]}.diff"] = d
                elif k.endswith(".bias"):
                    out[f"diffusion_model.{k[:-len('.bias')]}.diff_b"] = d
            return out
        if fmt == "unet":  # ComfyUI/ldm diffusion-model keys, float32 (fp16 would round away updates)
            base = self.base_model.diffusion_model.state_dict()
            return {k: base[k].detach().float().cpu() + deltas.get(k, 0) for k in base}
        raise ValueError(f"unknown export format {fmt!r}; choose lora, offset or unet")

    def metadata(self, fmt: str) -> dict[str, str]:
        cfg = self.base_model.model_config
        meta = {
            "comfy_selfnpo.format": fmt,
            "comfy_selfnpo.base_model_hash": self.base_hash,
            "comfy_selfnpo.architecture": f"{type(cfg).__name__}/{self.base_model.model_type.name}",
            "comfy_selfnpo.config": json.dumps(self.config.to_dict(), sort_keys=True),
            "comfy_selfnpo.steps": str(self.step),
            "comfy_selfnpo.data": type(self.data).__name__,
        }
        if fmt == "lora":
            meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(self.config.lora_rank),
                         "ss_network_alpha": str(self.config.lora_alpha), "ss_steps": str(self.step)})
        return meta

    def export(self, path, format=None) -> Path:
        fmt = format or self.config.output_format
        with torch.inference_mode(False):
            tensors = self.export_state_dict(fmt)
            return save_safetensors(path, tensors, self.metadata(fmt))

    def negative_model(self):
        """A clone of the base MODEL with the trained change as weight patches."""
        import comfy.lora

        with torch.inference_mode(False):
            clone = self.base_patcher.clone()
            if self.adapters is not None:
                key_map = comfy.lora.model_lora_keys_unet(self.base_model, {})
                patches = comfy.lora.load_lora(self.export_state_dict("lora"), key_map)
            else:
                patches = {f"diffusion_model.{k}": ("diff", (d,)) for k, d in self.weight_deltas().items()}
            clone.add_patches(patches, 1.0)
        return clone

    def to_model_cond(self, cond) -> dict:
        """A prompt string or a ComfyUI CONDITIONING -> the tensors apply_model takes."""
        if isinstance(cond, dict):
            return cond
        if not self._prepared:
            self._prepare()
        if isinstance(cond, str):
            return self._model_cond(*self._encode_text(cond), self._latent_hw)
        first = cond[0]
        return self._model_cond(first[0].float().cpu(), first[1].get("pooled_output"), self._latent_hw)

    def predict_x0(self, x, sigma, cond):
        """Student x0-prediction at noise level sigma (float or per-row tensor) for a prompt, a
        CONDITIONING or a cond dict (`c_crossattn`, ...)."""
        with torch.inference_mode(False), torch.no_grad():
            self._prepare()
            self._load_base()
            c = self.to_model_cond(cond)
            c = {k: v.to(self.device).expand(x.shape[0], *v.shape[1:]) if v.shape[0] == 1 else v.to(self.device)
                 for k, v in c.items()}
            x = x.to(self.device).float()
            sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(x.shape[0]).clone()
            with self._attached():
                if self.adapters is not None:
                    with self.adapters.use("student"), self._autocast():
                        return self.base_model.apply_model(x, sigma, **c).float()
                with self._autocast():
                    return self.student_model.apply_model(x, sigma, **c).float()
