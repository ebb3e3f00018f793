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
from .errors import ResumeMismatch

FORMAT = "comfy_selfnpo.tdft_checkpoint"
VERSION = 2
STATE_FILE = "state.pt"
# Settings a resumed run may change: they do not alter the math of the remaining steps
# (gradient checkpointing gives identical gradients; tested), so e.g. a run that ran out of memory
# can resume with checkpointing switched on. batch_size may change with the number of processes as
# long as the global batch stays the same (checked separately).
RESUMABLE_CHANGES = {"steps", "save_every", "keep_last", "output_format", "gradient_checkpointing", "batch_size"}


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


def damaged(folder, why: str) -> ResumeMismatch:
    """The error for a checkpoint that cannot be used, saying how to start over."""
    return ResumeMismatch(f"the checkpoint {str(state_file(folder))!r} is damaged or incomplete ({why}); "
                          f"it cannot be resumed. To start over, delete {str(Path(folder))!r} (or choose "
                          "another output folder/name); the exported weights stay usable")


def read(folder) -> dict:
    file = state_file(folder)
    if not file.is_file():
        raise ResumeMismatch(f"no TDFT checkpoint at {str(file)!r}")
    try:
        state = load_torch(file)
    except Exception as e:
        raise damaged(folder, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise damaged(folder, "not a comfy-selfnpo TDFT checkpoint")
    if state.get("version") != VERSION:
        raise ResumeMismatch(f"{str(file)!r} was written by another version of comfy-selfnpo (checkpoint "
                             f"format {state.get('version')}, this version reads {VERSION}); start a new run "
                             "(its exported weights remain usable)")
    return state


def check_resumable(saved: dict, now: RunIdentity, allow_data_change: bool = False) -> None:
    """ResumeMismatch naming what differs between a checkpoint's identity and this run's.
    allow_data_change: accept data whose content changed (same kind and count), e.g. fixed captions."""
    if saved["base_model_hash"] != now.base_model_hash:
        raise ResumeMismatch(
            f"the checkpoint was trained from another base model (hash {saved['base_model_hash']}, "
            f"this MODEL has {now.base_model_hash}); load the same checkpoint/LoRAs it was started with")
    old, new = saved["config"], now.config
    diffs = sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}" for k in diffs)
        raise ResumeMismatch(f"the checkpoint used other hyper-parameters ({detail}); resume "
                             "with the same settings or start a new run")
    if saved["global_batch"] != now.global_batch:
        raise ResumeMismatch(
            f"the checkpoint's global batch is {saved['global_batch']} (batch_size {old['batch_size']} × "
            f"{saved['processes']} process(es)), this run's is {now.global_batch} (batch_size "
            f"{new['batch_size']} × {now.processes}); keep batch_size × processes equal to resume")
    if saved["data_kind"] != now.data_kind:
        raise ResumeMismatch(f"the checkpoint trained on {saved['data_kind']}, this run on {now.data_kind}")
    if saved["data_fingerprint"] != now.data_fingerprint and not allow_data_change:
        raise ResumeMismatch(
            f"the training data changed since the checkpoint was saved (other {now.data_kind} or captions: "
            f"fingerprint {saved['data_fingerprint']} vs now {now.data_fingerprint}); resume with the same data, "
            "or accept the change explicitly (CLI: --allow-data-change), or start a new run")
