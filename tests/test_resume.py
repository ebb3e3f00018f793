"""Resume, outputs and exit codes (issue 18), driven through the CLI and the training node as users
drive them: what a resumed run may change (it continues with a notice) and what it may not (a
mismatch naming every difference, its own exit status, the checkpoint kept), an output folder that
already holds a run, checkpoints that survive a crash, ComfyUI's cancel raised inside a layer's
forward, and Ctrl+C while the CLI is still starting up."""
from __future__ import annotations

import csv
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import comfy.model_management
import comfy.ops
import comfy.utils
from cli_setup import base_args, files, run, snapshot, start_cli, summary, write_image  # noqa: F401
from comfy_selfnpo.training import cli
from test_train_node import NAME, run_dir, train_inputs
from test_train_node import summary as node_summary


def lrs(out: Path) -> dict[int, float]:
    with open(out / "loss.csv") as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f)}


def state_step(folder: Path) -> int:
    return int(torch.load(folder / "checkpoint" / "state.pt", weights_only=True)["step"])


# ------------------------------------------------------------------ what a resume may change


def test_every_setting_is_decided_once_for_resume():
    from comfy_selfnpo.training.checkpoint import FIXED, MAY_CHANGE
    from comfy_selfnpo.training.config import field_types

    assert set(MAY_CHANGE) | set(FIXED) == set(field_types()) and not set(MAY_CHANGE) & set(FIXED)


def test_the_help_documents_the_exit_statuses_of_an_existing_run_and_a_mismatch(capsys):
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"{cli.EXIT_EXISTS} the output folder already holds a checkpoint" in text
    assert f"{cli.EXIT_MISMATCH} resume refused" in text
    assert len({cli.EXIT_EXISTS, cli.EXIT_MISMATCH, cli.EXIT_WRITE, cli.EXIT_INPUT}) == 4


def test_a_resume_with_another_learning_rate_schedule_and_length_continues_with_a_notice(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=2))
    assert code == cli.EXIT_OK, err
    code, err = run(capsys, *base_args(files, out, "--resume", "--learning-rate", "2e-3", "--lr-schedule", "cosine",
                                       "--max-grad-norm", "0.5", steps=4))
    assert code == cli.EXIT_OK, err
    assert "resuming with a changed setting: learning_rate: checkpoint 0.001, now 0.002" in err
    s = summary(out)
    assert s["resumed_from_step"] == 2 and s["step"] == 4
    assert sorted(line.split(":")[0] for line in s["resume_changes"]) == [
        "learning_rate", "lr_schedule", "max_grad_norm", "steps"]
    used = lrs(out)
    # steps 1-2 at the first run's constant 1e-3; steps 3-4 on the new cosine over 4 steps from 2e-3
    cosine = {step: 2e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 4)) for step in (3, 4)}
    assert used[1] == used[2] == 1e-3
    assert used[3] == pytest.approx(cosine[3], rel=1e-12) and used[4] == pytest.approx(cosine[4], rel=1e-12)


def test_a_resume_that_changes_the_run_is_a_mismatch_naming_every_difference(files, capsys, tiny):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_OK, err
    before = snapshot(out)
    tiny.save_checkpoint(str(files / "other.safetensors"), "sd15", seed=9)
    other_prompts = files / "other-prompts.txt"
    other_prompts.write_text("a green pyramid\na yellow sphere on grass\na portrait of a dog\n")
    cases = {  # what differs -> (extra flags, what the message must name with both values)
        "base model": (["--checkpoint", files / "other.safetensors"], ["base model: checkpoint "]),
        "global batch": (["--batch-size", 2], ["global batch: checkpoint 1 (batch_size 1 × 1 process(es)), now 2"]),
        "data": (["--prompts", other_prompts], ["data: other prompts or captions", "--allow-data-change"]),
        "rank and seed": (["--lora-rank", 8, "--seed", 2],
                          ["lora_rank: checkpoint 4, now 8 (what is trained)", "seed: checkpoint 1, now 2"]),
    }
    for case, (flags, named) in cases.items():
        code, err = run(capsys, *base_args(files, out, "--resume", steps=2), *flags)
        assert code == cli.EXIT_MISMATCH, (case, err)
        assert "differs from the run its checkpoint belongs to" in err and "Traceback" not in err, case
        assert all(text in err for text in named), (case, err)
        assert "damaged" not in err and "delete" not in err, case  # the checkpoint is fine and stays
        assert snapshot(out) == before, case


def test_an_output_folder_holding_a_run_exits_with_its_documented_status(files, capsys):
    out = files / "out"
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_OK, err
    before = snapshot(out)
    code, err = run(capsys, *base_args(files, out, steps=1))
    assert code == cli.EXIT_EXISTS != cli.EXIT_WRITE
    assert "already holds a training checkpoint" in err and "--resume" in err and "delete" not in err
    assert snapshot(out) == before


# ------------------------------------------------------------------ periodic checkpoints


def test_periodic_checkpoints_are_the_default_and_a_killed_run_resumes_from_one(files, capsys):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT

    args = base_args(files, files / "short", steps=1)
    del args[args.index("--save-every"):args.index("--save-every") + 2]
    code, err = run(capsys, *args)
    assert code == cli.EXIT_OK, err
    default = summary(files / "short")["config"]["save_every"]
    assert default == 100  # the CLI's (TDFTConfig's) default ...
    node_inputs = SelfNPOTrainTDFT.define_schema().inputs
    assert next(i.default for i in node_inputs if i.id == "save_every") == default  # ... is the node's

    # a crash (kill -9) after a periodic save loses only the steps since it (the tiny run saves every
    # 2 steps: 100 would take too long here)
    out = files / "killed"
    proc = start_cli(base_args(files, out, "--save-every", 2, steps=40))
    deadline = time.monotonic() + 240
    while not (out / "checkpoint" / "state.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.kill()
    proc.communicate()
    saved = state_step(out)
    assert saved >= 2 and saved % 2 == 0 and not (out / "self_npo.safetensors").exists()
    code, err = run(capsys, *base_args(files, out, "--resume", "--save-every", 2, steps=saved + 1))
    assert code == cli.EXIT_OK, err
    assert summary(out)["resumed_from_step"] == saved and summary(out)["step"] == saved + 1


# ------------------------------------------------------------------ the node: running again under a name


def test_the_node_offers_continue_start_over_and_changed_data_for_an_existing_run(comfy_registry, comfy_dirs, tiny,
                                                                                  caplog):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT
    from comfy_selfnpo.training.errors import ResumeMismatch

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    train = lambda **changes: SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None,  # noqa: E731
                                                       **train_inputs(**changes))
    with torch.inference_mode():
        train(steps=2)
        train(steps=3, learning_rate=2e-3, on_existing_run="continue")  # a safe change: continues
        s = node_summary(comfy_dirs)
        assert s["resumed_from_step"] == 2 and s["step"] == 3 and s["resume_changes"][0].startswith("learning_rate")

        other_prompts = "a green pyramid\na yellow sphere on grass\na portrait of a dog"
        with pytest.raises(ResumeMismatch, match="data: other prompts.*continue_with_changed_data") as info:
            train(steps=4, prompts=other_prompts)
        # no CLI flag the node lacks, no advice to delete the checkpoint
        assert "--" not in str(info.value) and not re.search(r"\bdelete\b", str(info.value))
        train(steps=4, prompts=other_prompts, on_existing_run="continue_with_changed_data")
        assert node_summary(comfy_dirs)["resumed_from_step"] == 3

        old_files, old_weights = snapshot(run_dir(comfy_dirs)), {
            p.name: p.read_bytes() for p in comfy_dirs["self_npo"].glob(f"{NAME}*.safetensors")}
        with pytest.raises(ResumeMismatch, match="lora_rank: checkpoint 4, now 8.*on_existing_run to start_over"):
            train(steps=2, lora_rank=8)
        train(steps=2, lora_rank=8, on_existing_run="start_over")
    s = node_summary(comfy_dirs)
    assert s["resumed_from_step"] is None and s["step"] == 2 and s["config"]["lora_rank"] == 8
    # nothing of the earlier run was deleted: its folder and weights were moved aside, byte for byte
    asides = sorted(run_dir(comfy_dirs).parent.glob(f"{NAME}-old-*"))
    assert f"the earlier run's files were moved to {asides[0]}" in caplog.text
    assert len(asides) == 1 and snapshot(asides[0]) == old_files and state_step(asides[0]) == 4
    tag = asides[0].name[len(NAME):]
    moved = {p.name.replace(tag, "", 1): p.read_bytes() for p in comfy_dirs["self_npo"].glob(f"{NAME}{tag}*")}
    assert moved == old_weights and f"{NAME}-step000004.safetensors" in moved


# ------------------------------------------------------------------ cancel in ComfyUI


class CancelInsideAForward:
    """Presses cancel as the server does — sets comfy.model_management's flag from outside — at the
    first forward of a comfy.ops layer in one pass (teacher: without grad, student: with) after
    training step `after` was reported. Core's own check at the start of that layer's forward
    (comfy/ops.py, run_every_op) then raises InterruptProcessingException in the middle of a step."""

    def __init__(self, after: int, total: int, student: bool):
        self.after, self.total, self.student = after, total, student
        self.armed_at = self.fired_in = None

    def progress(self, value, total, preview, node_id=None, prompt_id=None):
        if total == self.total and value >= self.after and self.armed_at is None:
            self.armed_at = value

    def pre_forward(self, module, args):
        if (self.armed_at is not None and self.fired_in is None and isinstance(module, comfy.ops.CastWeightBiasOp)
                and torch.is_grad_enabled() == self.student):
            self.fired_in = type(module).__name__
            comfy.model_management.interrupt_current_processing(True)

    def __enter__(self):
        # every step's report reaches the hook (ComfyUI's bar otherwise drops reports closer than 0.1 s)
        self.throttle = comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL, comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT = 0
        comfy.utils.set_progress_bar_global_hook(self.progress)
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.pre_forward)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL, comfy.utils.PROGRESS_THROTTLE_MIN_PERCENT = self.throttle
        comfy.model_management.interrupt_current_processing(False)


def assert_cancelled_at_the_last_whole_step(comfy_dirs, cancel) -> None:
    from comfy_selfnpo.training.run_lock import RunLock

    s = node_summary(comfy_dirs)
    assert cancel.fired_in is not None and cancel.armed_at is not None
    assert s["status"] == "cancelled" and s["step"] == cancel.armed_at
    assert state_step(run_dir(comfy_dirs)) == cancel.armed_at
    assert not comfy.model_management.processing_interrupted()  # the next prompt can run
    RunLock(run_dir(comfy_dirs)).acquire().release()  # the run folder was released


@pytest.mark.parametrize("student", [False, True], ids=["teacher-pass", "student-pass"])
def test_a_cancel_raised_inside_a_forward_saves_the_last_step_and_the_next_run_resumes_it(comfy_registry, comfy_dirs,
                                                                                         tiny, student):
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    inputs = dict(steps=4, save_every=0)
    with torch.inference_mode():
        straight = SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None,
                                            **train_inputs(output_name="straight", **inputs)).result[1]
        with CancelInsideAForward(after=2, total=4, student=student) as cancel, \
                pytest.raises(comfy.model_management.InterruptProcessingException):
            SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(**inputs))
        assert_cancelled_at_the_last_whole_step(comfy_dirs, cancel)
        assert cancel.armed_at < 4 and not (comfy_dirs["self_npo"] / f"{NAME}.safetensors").exists()
        resumed = SelfNPOTrainTDFT.execute(ckpt.model, ckpt.clip, vae=None, **train_inputs(**inputs)).result[1]
    s = node_summary(comfy_dirs)
    assert s["status"] == "finished" and s["resumed_from_step"] == cancel.armed_at and s["step"] == 4
    a, b = safetensors.torch.load_file(straight), safetensors.torch.load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never cancelled


def test_a_cancel_inside_a_forward_through_comfyuis_executor(comfy_registry, comfy_dirs, tiny):
    import execution
    from comfy_exec import ServerStub, validate

    tiny.save_checkpoint(str(comfy_dirs["checkpoints"] / "tiny.safetensors"), "sd15", seed=0)
    prompt = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
              "train": {"class_type": "SelfNPOTrainTDFT",
                        "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], **train_inputs(steps=3, save_every=0)}}}

    def execute() -> list[str]:
        valid, error, outputs, node_errors = validate(prompt)
        assert valid, (error, node_errors)
        executor = execution.PromptExecutor(ServerStub(), cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0})
        executor.execute(prompt, "prompt", {}, outputs)
        return [event for event, _ in executor.status_messages]

    with CancelInsideAForward(after=1, total=3, student=True) as cancel:
        events = execute()
    assert "execution_interrupted" in events and "execution_error" not in events
    assert_cancelled_at_the_last_whole_step(comfy_dirs, cancel)
    assert "execution_success" in execute()
    s = node_summary(comfy_dirs)
    assert s["status"] == "finished" and s["resumed_from_step"] == cancel.armed_at and s["step"] == 3


# ------------------------------------------------------------------ Ctrl+C while starting up


def wait_for_the_stop_handler(proc) -> None:
    """Wait until the CLI catches SIGTERM (Python does not by default: it is the CLI's stop handler,
    Linux's /proc tells); fail if torch was loaded before it (a Ctrl+C during the imports could be
    lost). Each round reads the loaded libraries first: torch seen before the handler is conclusive."""
    deadline = time.monotonic() + 60
    while True:
        torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
        if caught >> (signal.SIGTERM - 1) & 1:
            return
        assert not torch_loaded, "torch was imported before the CLI's stop handler was installed"
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.001)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's state from Linux's /proc")
def test_ctrl_c_while_starting_up_stops_the_run_with_status_130(files):
    """main() installs its stop handler first, before torch and ComfyUI are imported; from then on a
    SIGINT at any time while they are imported and the model is loaded ends the run with 130 before
    training, never lost (a KeyboardInterrupt there could land in a library's bare `except:`, and the
    run trained to the end). Before main() runs, the interpreter's own start-up answers the signal."""
    for delay in (0.0, 0.05, 0.5):
        out = files / f"out-{delay}"
        proc = start_cli(base_args(files, out, steps=100_000))
        wait_for_the_stop_handler(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"SIGINT {delay} s after start-up was lost: the run kept training") from None
        assert proc.returncode == 130, (delay, err)
        assert "SIGINT received" in err and "Traceback" not in err, (delay, err)
        assert not (out / "self_npo.safetensors").exists()
        if (out / "summary.json").exists():  # the signal came once training had begun: a clean cancel
            assert summary(out)["status"] == "cancelled", delay


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_the_value_it_used():
    """A checkpoint written before `adapter` (crop, expert) existed trained a LoRA (centre crops, the whole
    noise range): it resumes as one, and only as one."""
    from dataclasses import asdict

    from comfy_selfnpo.training.checkpoint import ADDED_LATER, RunIdentity, check_resumable
    from comfy_selfnpo.training.config import make_config
    from comfy_selfnpo.training.errors import ResumeMismatch

    # a run today that uses what runs before these settings used (as a resolved config stores them)
    now = RunIdentity({**make_config("lora-8gb").to_dict(), **ADDED_LATER}, "hash", "prompts", "fp", 1, 1)
    saved = asdict(now)
    for key in ADDED_LATER:
        del saved["config"][key]
    assert check_resumable(saved, now) == []
    other = RunIdentity({**now.config, "adapter": "loha"}, "hash", "prompts", "fp", 1, 1)
    with pytest.raises(ResumeMismatch, match="adapter: checkpoint 'lora', now 'loha'"):
        check_resumable(saved, other)
