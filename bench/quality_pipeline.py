"""The computing parts of the quality benchmark (bench/quality.py): the budget, the data split, the
base model, the negative models and the sampling jobs.

Negative-model training and sampling run as jobs in worker processes (or in the calling process when
there is one worker). A job is a pure function of its arguments and of the files the earlier stages
wrote into the work folder, computed on one thread: the results do not depend on how many workers
run or in which order the jobs finish. Models travel between processes as files: the base UNet as
safetensors, each negative model as a weight offset (`.diff`, the format of ComfyUI's LoraSave
full_diff and of the trainer's `export(format="offset")`) loaded back with ComfyUI's own LoRA
loader, as a user's LoraLoader node would.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a run."""
    base_steps: int = 2000          # training the digits model from scratch
    base_batch: int = 64
    base_lr: float = 2e-3
    npo_steps: int = 300            # each negative model: TDFT (both kinds) and the control
    npo_batch: int = 32
    npo_lr: float = 2e-5            # 1 % of base_lr: the paper's ratio (1e-6 on SD1.5, trained at 1e-4)
    npo_buffer: int = 64            # data-free TDFT: buffered trajectories
    classifier_epochs: int = 30
    per_class: int = 25             # held-out real digits per class = generated samples per class and seed
    seeds: tuple = (0, 1, 2)        # sampling noise seeds
    guidance_scales: tuple = (1.5, 2.5, 4.0)
    sampling_steps: int = 10        # euler: FD within 15 % of 32 steps
    sampler: str = "euler"
    scheduler: str = "normal"
    data_seed: int = 0              # split, model initialisation, training draws
    threads: int = 1                # torch threads of the classifier and base-model training. Fixed:
                                    # float sums, hence the trained weights, depend on it; and on a
                                    # small shared CPU a second thread gains 1.4x when the machine is
                                    # idle but loses 15x when it is busy (OpenMP threads spin-wait)

    @classmethod
    def from_dict(cls, d: dict) -> "Budget":
        return cls(**{**d, "seeds": tuple(d["seeds"]), "guidance_scales": tuple(d["guidance_scales"])})

    def base_fingerprint(self) -> str:
        """What the trained base model depends on."""
        return repr((self.base_steps, self.base_batch, self.base_lr, self.data_seed, self.per_class, self.threads))


@dataclass(frozen=True)
class Setup:
    """What every job needs to rebuild its inputs (picklable)."""
    work_dir: str
    budget: dict

    @property
    def base_file(self) -> Path:
        return Path(self.work_dir) / "base_unet.safetensors"

    def negative_file(self, name: str) -> Path:
        return Path(self.work_dir) / "negatives" / f"{name}.safetensors"


# ------------------------------------------------------------------------------------------------
# data and base model (calling process)

@dataclass
class Digits:
    train_images: object
    train_labels: object
    test_images: object
    test_labels: object

    @property
    def sample_labels(self):
        """The labels of one generated batch: per_class of each class, grouped (as the test set)."""
        return self.test_labels.sort().values


def load_digits_images():
    """scikit-learn's digits as (images [1797, 8, 8] in [0, 1], labels [1797] int64). scikit-learn
    ships the data inside the package, so this works offline."""
    import torch

    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits data come with scikit-learn; install the benchmark extra: "
                          "pip install -e '.[bench]'") from e
    data = load_digits()
    images = torch.from_numpy(data.images).float() / 16.0
    return images, torch.from_numpy(data.target).long()


def split_digits(per_class: int, seed: int) -> Digits:
    """A stratified held-out set of `per_class` digits per class; the rest trains."""
    import torch

    images, labels = load_digits_images()
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    test = torch.cat([order[labels[order] == c][:per_class] for c in range(10)])
    is_train = torch.ones(labels.shape[0], dtype=torch.bool)
    is_train[test] = False
    return Digits(images[is_train], labels[is_train], images[test], labels[test])


def train_base_model(setup: Setup, digits: Digits, log, reuse: bool = False) -> list[float]:
    """Train the digits model from scratch and save its UNet to setup.base_file. With `reuse`, an
    earlier run's file made with the same budget is kept instead (a development shortcut)."""
    import safetensors.torch
    from comfy_selfnpo.digits import model as dm

    budget = Budget.from_dict(setup.budget)
    if reuse and setup.base_file.is_file():
        with safetensors.safe_open(str(setup.base_file), "pt") as f:
            if (f.metadata() or {}).get("budget") == budget.base_fingerprint():
                log(f"  reusing {setup.base_file}")
                return []
    settings = dm.DenoiserTraining(steps=budget.base_steps, batch_size=budget.base_batch,
                                   learning_rate=budget.base_lr, seed=budget.data_seed)
    every = max(1, budget.base_steps // 10)
    trained = dm.train_digits_model(digits.train_images, digits.train_labels, settings, on_step=lambda s, l: log(
        f"  base model step {s}/{budget.base_steps} loss {l:.4f}") if s % every == 0 else None)
    setup.base_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in trained.model.model.diffusion_model.state_dict().items()}
    safetensors.torch.save_file(state, str(setup.base_file), metadata={"budget": budget.base_fingerprint()})
    return trained.losses


def unet_parameters(setup: Setup) -> int:
    import math
    import safetensors

    with safetensors.safe_open(str(setup.base_file), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


# ------------------------------------------------------------------------------------------------
# worker state: models rebuilt from the work folder, once per process

WORKER: dict = {}


def init_worker(setup: Setup, boot: bool = True) -> None:
    if boot:
        from _boot import boot_comfyui
        import logging

        boot_comfyui(cpu=True)
        logging.getLogger().setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    WORKER.clear()
    WORKER["setup"] = setup
    WORKER["budget"] = Budget.from_dict(setup.budget)


def _cached(key, build):
    if key not in WORKER:
        WORKER[key] = build()
    return WORKER[key]


def base():
    """(MODEL, CLIP, PromptConds) of the trained base model."""
    def build():
        import safetensors.torch
        from comfy_selfnpo.digits import model as dm

        model, clip = dm.build_digits_checkpoint(WORKER["budget"].data_seed)
        model.model.diffusion_model.load_state_dict(safetensors.torch.load_file(str(WORKER["setup"].base_file)))
        return model, clip, dm.PromptConds.encode(clip)
    return _cached("base", build)


def digits() -> Digits:
    b = WORKER["budget"]
    return _cached("digits", lambda: split_digits(b.per_class, b.data_seed))


def negative_model(name: str):
    """The negative MODEL `name`: the base model plus its offset file, through ComfyUI's LoRA loader."""
    def build():
        import comfy.sd
        import comfy.utils

        offset = comfy.utils.load_torch_file(str(WORKER["setup"].negative_file(name)), safe_load=True)
        model, _clip = comfy.sd.load_lora_for_models(base()[0], None, offset, 1.0, 0.0)
        return model
    return _cached(("negative", name), build)


# ------------------------------------------------------------------------------------------------
# jobs: negative models

def _tdft(name: str, data) -> list[float]:
    from comfy_selfnpo.training import TDFTTrainer, make_config

    b, setup = WORKER["budget"], WORKER["setup"]
    # the SD1.5 recipe's algorithm (N = 25, K = 5, w = -1, pseudo-Huber, EMA teacher), full weights,
    # at the benchmark's budget; resolution 64 = the 8x8 latent (data-free mode draws latents of it)
    config = make_config("sd15", steps=b.npo_steps, batch_size=b.npo_batch, grad_accum=1,
                         learning_rate=b.npo_lr, mixed_precision="no", resolution=64,
                         trajectory_buffer=b.npo_buffer, seed=b.data_seed, output_format="offset", optimizer="adamw")
    model, clip, _conds = base()
    trainer = TDFTTrainer(model, clip, None, data, config, Path(setup.work_dir) / name, log=lambda m: None)
    result = trainer.train()
    trainer.export(setup.negative_file(name), format="offset")
    return result.losses


def self_npo_data_free() -> list[float]:
    from comfy_selfnpo.digits.model import PROMPTS
    from comfy_selfnpo.training import PromptList

    return _tdft("self_npo_data_free", PromptList(list(PROMPTS)))


def self_npo_data() -> list[float]:
    from comfy_selfnpo.digits.model import images_to_latents, prompt_for
    from comfy_selfnpo.training import LatentDataset

    d = digits()
    return _tdft("self_npo_data", LatentDataset(images_to_latents(d.train_images),
                                                [prompt_for(int(c)) for c in d.train_labels]))


def finetune_control() -> list[float]:
    """Plain fine-tuning on real data with TDFT's budget and optimiser settings (constant learning
    rate, AdamW, weight decay 1e-3, clip 1.0, no condition dropout: TDFT's student always sees the
    caption), saved in the same offset format and used as the negative model the same way."""
    import safetensors.torch
    from comfy_selfnpo.digits import model as dm
    from comfy_selfnpo.training.export import offset_state_dict

    b, d = WORKER["budget"], digits()
    model, _clip, conds = base()
    copy, _ = dm.build_digits_checkpoint(b.data_seed)
    copy.model.diffusion_model.load_state_dict(model.model.diffusion_model.state_dict())
    settings = dm.DenoiserTraining(steps=b.npo_steps, batch_size=b.npo_batch, learning_rate=b.npo_lr,
                                   uncond_probability=0.0, warmup_steps=0, ema_decay=0.0, seed=b.data_seed)
    losses = dm.train_denoiser(copy, dm.images_to_latents(d.train_images), conds.for_labels(d.train_labels),
                               conds.uncond, settings)
    base_state = model.model.diffusion_model.state_dict()
    offset = offset_state_dict({k: (v.float() - base_state[k].float()).contiguous()
                                for k, v in copy.model.diffusion_model.state_dict().items()})
    path = WORKER["setup"].negative_file("finetune_control")
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(offset, str(path))
    return losses


NEGATIVES = {
    "self_npo_data_free": self_npo_data_free,
    "self_npo_data": self_npo_data,
    "finetune_control": finetune_control,
}


def train_negative_job(name: str):
    """-> (name, losses, CPU seconds)."""
    start = time.process_time()
    losses = NEGATIVES[name]()
    return name, losses, time.process_time() - start


# ------------------------------------------------------------------------------------------------
# jobs: sampling

@dataclass(frozen=True)
class SampleJob:
    row: str                  # the row's name (the key of its results)
    negative: str             # "" = plain CFG on the base model
    options: tuple            # apply_self_npo keyword arguments as sorted (key, value) pairs
    g: float
    seed: int


def guided_model(negative: str, options: tuple):
    """The MODEL KSampler samples: the base model (plain CFG) or apply_self_npo of it."""
    if not negative:
        return base()[0]

    def build():
        from comfy_selfnpo.npo import guidance

        return guidance.apply_self_npo(base()[0], negative_model(negative), residency="auto", **dict(options))
    return _cached(("guided", negative, options), build)


def sample_digits(model, g: float, seed: int):
    """One batch of `per_class` digits of every class: [N, 8, 8]."""
    from comfy_selfnpo.digits.model import sample_digits as sample

    b = WORKER["budget"]
    return sample(model, base()[2], digits().sample_labels, g, seed, b.sampling_steps, b.sampler, b.scheduler)


def sample_job(job: SampleJob):
    """-> (job, images, CPU seconds)."""
    start = time.process_time()
    return job, sample_digits(guided_model(job.negative, job.options), job.g, job.seed), time.process_time() - start
