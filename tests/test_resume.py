"""Resume, outputs and exit codes (issue 18), driven through the CLI and the training node as users
drive them: what a resumed run may change (it continues with a notice) and what it may not (a
mismatch naming every difference, its own exit status, the checkpoint kept), an output folder that
already holds a run, checkpoints that survive a crash, ComfyUI's cancel raised inside a layer's
forward, and Ctrl+C while the CLI is still starting up."""
from __future__ import annotations

import csv
import math
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
