"""What a TDFT run trains: all weights (`FullWeights`, the paper) or an adapter — LoRA, LoHa or LoKr,
ComfyUI's own (`LoRAWeights`, adapters.py; an extension). Chosen once by `make_trained`; the trainer only uses the shared interface:

  student_forward / teacher_forward(x, sigma, cond)   x0-predictions (BaseModel.apply_model)
  module, parameters(), may_skip_parameters           what the optimizer and DDP see
  streamed_student_layers(device)                     layers of the student ComfyUI streams in (streaming.py)
  active()                                            context in which forwards use the trained weights
  student_diffusion_model                             the network whose blocks gradient checkpointing wraps
  update_teacher()                                    the EMA step θ⁻ ← d·θ⁻ + (1 − d)·θ (no-op for a frozen teacher)
  state_dict / load_state_dict                        student and teacher, for checkpoints
  weight_deltas, lora_tensors, model_patches          what export and the negative MODEL are made of
  lora_model                                          the node's LORA_MODEL output

Neither ever changes the caller's MODEL in place:
  * full: the student (and an EMA teacher) are separate float32 copies rebuilt from the model config
    and its state dict (ComfyUI models cannot be deep-copied); the frozen teacher is the loaded model
    itself, used without gradients;
  * LoRA mode: adapters hooked into the loaded model only inside `active()`; the frozen teacher is
    the same model with the adapter off.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import TrainingError, UnsupportedModel
from .adapters import AdapterSet
from .streaming import streamed_layers
from .trained_kinds import TRAINED_KINDS


def _cpu_copy(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class EMATeacher:
    """The teacher's weights as an exponential moving average of the student's."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = module, float(decay)
        module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student_params: list) -> None:
        # lerp: θ⁻ + (1 − d)·(θ − θ⁻) = d·θ⁻ + (1 − d)·θ, one fused kernel over all tensors
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in student_params],
                             1.0 - self.decay)

    def state_dict(self):
        return _cpu_copy(self.module)

    def load_state_dict(self, state) -> None:
        self.module.load_state_dict(state)

    def own_bytes(self) -> int:
        return _module_bytes(self.module)

    def to(self, device) -> None:
        self.module.to(device)


class FrozenTeacher:
    """The teacher is the model training started from; nothing to update or save."""

    def update(self, student_params: list) -> None:
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass

    def own_bytes(self) -> int:
        return 0

    def to(self, device) -> None:
        pass  # the loaded model itself: ComfyUI's model management places it


def make_teacher(config, ema_copy):
    """The teacher `config.teacher` asks for: an EMA of the student over `ema_copy()` (a copy of the
    student's trained tensors), or the frozen initial model."""
    return EMATeacher(ema_copy(), config.ema_decay) if config.teacher == "ema" else FrozenTeacher()


def make_autograd_safe(module: torch.nn.Module) -> None:
    """Tensors created under torch.inference_mode() (ComfyUI loads models inside it) cannot be saved
    for backward. Swap such parameters/buffers for ordinary clones with identical values."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.is_inference():
                setattr(sub, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def effective_state_dict(patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's weights as the MODEL means them (float32, CPU): stored weights with the
    MODEL's patches (the user's LoRAs) applied on the side — whether ComfyUI merged them into the
    module, applies them at cast time (low-VRAM, dynamic VRAM) or has not loaded the model yet."""
    from ..npo.weights import effective_weight

    base = patcher.model
    cpu = torch.device("cpu")
    return {k: effective_weight(patcher, f"diffusion_model.{k}", device=cpu)
            for k in base.diffusion_model.state_dict()}


def rebuild_float32(patcher):
    """An independent float32 copy (on the CPU) of a ComfyUI MODEL (copy.deepcopy fails on them):
    a new BaseModel built from a copy of its config, loaded with its effective weights."""
    base_model = patcher.model
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
    missing, unexpected = copy_model.diffusion_model.load_state_dict(effective_state_dict(patcher), strict=False)
    if missing or unexpected:
        raise UnsupportedModel(f"could not copy the model for training (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    copy_model.diffusion_model.to(dtype=torch.float32)
    return copy_model


class _Trained:
    """What both kinds share: the optimizer's parameters are `module`'s, the teacher follows them, and
    a checkpoint holds the student and the teacher."""

    def parameters(self) -> list:
        return list(self.module.parameters())

    def update_teacher(self) -> None:
        self.teacher.update(self.parameters())

    def state_dict(self) -> dict:
        return {"student": _cpu_copy(self.module), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])


class FullWeights(_Trained):
    """Full fine-tuning (the paper): a float32 student copy of the whole diffusion model."""
    may_skip_parameters = True  # architectures have layers some inputs never reach

    def __init__(self, base_patcher, config):
        self.base_patcher, self.base_model = base_patcher, base_patcher.model
        self.student_model = rebuild_float32(base_patcher)
        self.student_model.diffusion_model.requires_grad_(True).train()
        self.teacher_model = rebuild_float32(base_patcher) if config.teacher == "ema" else self.base_model
        self.teacher = make_teacher(config, lambda: self.teacher_model.diffusion_model)

    @property
    def module(self) -> torch.nn.Module:
        return self.student_model.diffusion_model

    @property
    def student_diffusion_model(self) -> torch.nn.Module:
        return self.student_model.diffusion_model

    def streamed_student_layers(self, device) -> list:
        return []  # the student is its own copy, fully on the device; the loaded model only serves the teacher

    def student_forward(self, x, sigma, cond):
        return self.student_model.apply_model(x, sigma, **cond)

    def teacher_forward(self, x, sigma, cond):
        return self.teacher_model.apply_model(x, sigma, **cond)

    def active(self):
        return contextlib.nullcontext()

    def to(self, device) -> None:
        self.student_model.diffusion_model.to(device)
        self.teacher.to(device)

    def own_bytes(self) -> int:
        return _module_bytes(self.module) + self.teacher.own_bytes()

    @torch.no_grad()
    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """diffusion-model state-dict key -> trained minus the MODEL's effective weights (float32, CPU)."""
        base = effective_state_dict(self.base_patcher)
        return {k: v.detach().float().cpu() - base[k] for k, v in self.module.state_dict().items()}

    def lora_tensors(self) -> dict:
        raise TrainingError("a full-mode run cannot be saved as a LoRA; use format 'offset' (exact) or 'unet'")

    def lora_model(self) -> dict:
        """What core's LORA_MODEL output carries: nothing (a full offset would hold GBs in ComfyUI's cache)."""
        return {}

    def model_patches(self) -> dict:
        return {f"diffusion_model.{k}": ("diff", (d,)) for k, d in self.weight_deltas().items()}


class LoRAWeights(_Trained):
    """An adapter on the loaded model (extension): LoRA, LoHa or LoKr (`config.adapter`, ComfyUI's own
    trainable adapters, adapters.py); only the adapter's tensors train."""
    may_skip_parameters = False  # every targeted layer runs in every forward pass

    def __init__(self, base_patcher, config):
        self.base_patcher = base_patcher
        self.base_model = base_model = base_patcher.model
        make_autograd_safe(base_model.diffusion_model)  # its weights join the autograd graph
        with_ema = config.teacher == "ema"
        self.adapters = AdapterSet(base_model.diffusion_model, config.lora_targets, config.lora_rank,
                                   config.lora_alpha, config.seed, with_ema=with_ema, adapter=config.adapter)
        self.teacher = make_teacher(config, lambda: self.adapters.ema)
        self._teacher_adapter = "ema" if with_ema else "off"

    @property
    def module(self) -> torch.nn.Module:
        return self.adapters.layers

    @property
    def student_diffusion_model(self) -> torch.nn.Module:
        return self.base_model.diffusion_model

    def streamed_student_layers(self, device) -> list:
        return streamed_layers(self.base_model.diffusion_model, device)  # the student is the loaded model

    def student_forward(self, x, sigma, cond):
        with self.adapters.use("student"):
            return self.base_model.apply_model(x, sigma, **cond)

    def teacher_forward(self, x, sigma, cond):
        with self.adapters.use(self._teacher_adapter):
            return self.base_model.apply_model(x, sigma, **cond)

    def active(self):
        return self.adapters.attached(self.base_model.diffusion_model)

    def to(self, device) -> None:
        self.adapters.to(device)

    def own_bytes(self) -> int:
        return _module_bytes(self.adapters)

    @torch.no_grad()
    def weight_deltas(self) -> dict[str, torch.Tensor]:
        return {f"{n}.weight": d.cpu() for n, d in self.adapters.weight_deltas().items()}

    def lora_tensors(self) -> dict:
        return self.adapters.file_state_dict(self.base_model)

    def lora_model(self) -> dict:
        """What core's LORA_MODEL output carries: the LoRA."""
        return self.lora_tensors()

    def model_patches(self) -> dict:
        import comfy.lora

        key_map = comfy.lora.model_lora_keys_unet(self.base_model, {})
        return comfy.lora.load_lora(self.lora_tensors(), key_map)


TRAINED = {mode: globals()[name] for mode, name in TRAINED_KINDS.items()}  # the rows of trained_kinds.py


def make_trained(base_patcher, config):
    """The trained weights for `config.mode`, on the MODEL `base_patcher`."""
    return TRAINED[config.mode](base_patcher, config)
