"""The resumable checkpoint of a TDFT run: its file layout, what it holds and when a run may resume it.

A checkpoint is a folder holding one file, `state.pt` (written atomically, so a crash or a full disk
never leaves half a checkpoint in place of the last good one):

  format, version            this layout (VERSION below)
  identity                   what the run is: config, base-model identity, data kind/fingerprint,
                             global batch (batch_size × processes)
  step, losses               progress
  trained                    the trained weights and the teacher's (what.TrainedWeights.state_dict)
  optimizer, scheduler, scaler
  starts                     the data position or the trajectory buffer (starts.*.state_dict)

Random draws are derived from (seed, step, item), so no generator state is needed: a resumed run
draws what the uninterrupted one would have drawn, on any number of processes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic_files import load_torch, save_torch
from .errors import ResumeMismatch, UnusableCheckpoint

FORMAT = "comfy_selfnpo.tdft_checkpoint"
VERSION = 2
STATE_FILE = "state.pt"

# What a resumed run may change, decided per setting. A setting in MAY_CHANGE only steers the steps
# still to come: the run continues with a logged notice (as kohya and ai-toolkit resume). Every other
# difference would make the saved state mean something else — another algorithm, network, optimizer,
# effective batch, random stream or data — so the resume is refused, naming each one. A setting in
# neither table is fixed (the safe default); a test keeps every TDFTConfig field in one of them.
MAY_CHANGE = {
    "steps": "the run's length",
    "learning_rate": "the step size of the steps to come",
    "lr_schedule": "the step size of the steps to come",
    "warmup_steps": "the step size of the steps to come",
    "max_grad_norm": "the gradient clipping of the steps to come",
    "save_every": "how often it is saved",
    "keep_last": "how many step files are kept",
    "output_format": "the file written",
    "gradient_checkpointing": "memory only: the gradients are identical (tested)",
    # the per-process share: the global batch (batch_size × processes) is checked on its own
    "batch_size": "the share of each process",
}
_ALGORITHM, _TRAINED, _OPTIMIZER, _DATA = ("the TDFT algorithm", "what is trained",
                                           "the optimizer whose state was saved", "the data")
FIXED = {
    **dict.fromkeys(("grid_size", "truncation_steps", "corruption_guidance", "uncond", "loss", "huber_c",
                     "teacher", "ema_decay", "expert", "expert_boundary"), _ALGORITHM),
    **dict.fromkeys(("mode", "adapter", "lora_rank", "lora_alpha", "lora_targets"), _TRAINED),
    **dict.fromkeys(("optimizer", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "mixed_precision"),
                    _OPTIMIZER),
    "grad_accum": "the effective batch",
    "seed": "the random draws",
    **dict.fromkeys(("resolution", "crop", "frames", "fps", "trajectory_buffer"), _DATA),
}

# Settings added after checkpoint format 2 came out, with the value every run saved before them
# used: a checkpoint without the key is read as having it, so older runs still resume.
ADDED_LATER = {"adapter": "lora", "crop": "center", "expert": "none", "expert_boundary": 0.0}


@dataclass(frozen=True)
class RunIdentity:
    config: dict
    base_model_hash: str
    data_kind: str          # "images" | "prompts"
    data_fingerprint: str
    global_batch: int       # batch_size × number of processes
    processes: int


def state_file(path) -> Path:
    """The state file of a checkpoint folder (or the file itself when given one)."""
    path = Path(path)
    return path if path.suffix in (".pt", ".pth") else path / STATE_FILE


def exists(folder) -> bool:
    return state_file(folder).is_file()


def write(folder, identity: RunIdentity, parts: dict) -> Path:
    """Atomically write the checkpoint; returns the folder."""
    state = {"format": FORMAT, "version": VERSION, "identity": asdict(identity), **parts}
    save_torch(state_file(folder), state)
    return Path(folder)


def damaged(folder, why: str) -> UnusableCheckpoint:
    """The error for a checkpoint that cannot be used, saying how to start over."""
    return UnusableCheckpoint(f"the checkpoint {str(state_file(folder))!r} is damaged or incomplete ({why}); "
                              f"it cannot be resumed. To start over, delete {str(Path(folder))!r} (or choose "
                              "another output folder/name); the exported weights stay usable")


def read(folder) -> dict:
    file = state_file(folder)
    if not file.is_file():
        raise UnusableCheckpoint(f"no TDFT checkpoint at {str(file)!r}")
    try:
        state = load_torch(file)
    except Exception as e:
        raise damaged(folder, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise damaged(folder, "not a comfy-selfnpo TDFT checkpoint")
    if state.get("version") != VERSION:
        raise UnusableCheckpoint(f"{str(file)!r} was written by another version of comfy-selfnpo (checkpoint "
                                 f"format {state.get('version')}, this version reads {VERSION}); start a new run "
                                 "(its exported weights remain usable)")
    return state


def check_resumable(saved: dict, now: RunIdentity, allow_data_change: bool = False) -> list[str]:
    """The notices of what this run changes that may change (MAY_CHANGE), or ResumeMismatch naming
    every difference that may not, each with the checkpoint's value and this run's.
    allow_data_change: accept data whose content changed (same kind), e.g. fixed captions."""
    old, new = {**ADDED_LATER, **saved["config"]}, now.config
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    both = {k: f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in changed}
    notices = [f"{both[k]} ({MAY_CHANGE[k]})" for k in changed if k in MAY_CHANGE]
    refused = [f"{both[k]} ({FIXED.get(k, 'a setting of the run')})" for k in changed if k not in MAY_CHANGE]
    if saved["base_model_hash"] != now.base_model_hash:
        refused.insert(0, f"base model: checkpoint {saved['base_model_hash']}, now {now.base_model_hash} (not the "
                          "checkpoint, LoRAs and model shift the run started with)")
    if saved["global_batch"] != now.global_batch:
        refused.append(f"global batch: checkpoint {saved['global_batch']} (batch_size {old['batch_size']} × "
                       f"{saved['processes']} process(es)), now {now.global_batch} (batch_size {new['batch_size']} "
                       f"× {now.processes}); keep batch_size × processes equal")
    if saved["data_kind"] != now.data_kind:
        refused.append(f"data: checkpoint {saved['data_kind']}, now {now.data_kind}")
    data_line = None
    if saved["data_kind"] == now.data_kind and saved["data_fingerprint"] != now.data_fingerprint:
        data_line = (f"data: other {now.data_kind} or captions than the checkpoint's (fingerprint "
                     f"{saved['data_fingerprint']}, now {now.data_fingerprint})")
        (notices if allow_data_change else refused).append(data_line)
    if refused:
        raise ResumeMismatch(
            "this run differs from the run its checkpoint belongs to, in what stays fixed within a run: "
            + "; ".join(refused) + ". The checkpoint is unchanged: resume with its values, or start a new run",
            differences=refused, data_only=refused == [data_line])
    return notices
