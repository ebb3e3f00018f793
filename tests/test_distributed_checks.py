"""A torchrun job's processes, started the way torchrun starts them (one process per rank with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) so that each one's own exit status can
be checked: a hung process, and processes started with different settings."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli_setup import PACK_ROOT, cli_executable, summary
from test_distributed import COMMON, dist_env, free_port, files  # noqa: F401  (files: the module fixture)


def start_ranks(per_rank_args: list[list], log_dir: Path) -> list[subprocess.Popen]:
    """One `comfy-selfnpo-train` per rank, with the environment torchrun gives it."""
    port, size = str(free_port()), len(per_rank_args)
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = dist_env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                   GROUP_RANK="0", MASTER_PORT=port)
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([cli_executable(), *map(str, args)], env=env, cwd=str(PACK_ROOT),
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
        log.close()
    return procs


def stop_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def rank_logs(log_dir: Path, size: int) -> list[str]:
    return [(log_dir / f"rank{rank}.log").read_text() for rank in range(size)]


def base_args(files: Path, out: Path, *extra) -> list:
    return ["--checkpoint", files / "tiny.safetensors", "--prompts", files / "prompts.txt", *COMMON,
            "--steps", 3, "--batch-size", 1, "--output", out, *extra]


def test_a_hung_process_ends_the_others_with_exit_7_within_the_timeout(files):
    """SIGSTOP on one process (a hung GPU, a frozen machine): gloo's collectives on the other time out
    after --dist-timeout ("Timed out ..."); that is a lost process (exit 7, a message), not a bug."""
    out, logs = files / "hung", files / "hung-logs"
    logs.mkdir()
    timeout = 12  # seconds: short, yet longer than the two processes drift apart while starting
    procs = start_ranks([base_args(files, out, "--steps", 500, "--save-every", 1, "--dist-timeout", timeout)] * 2,
                        logs)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint" / "state.pt").is_file():
            assert all(p.poll() is None for p in procs), rank_logs(logs, 2)
            assert time.monotonic() < deadline, rank_logs(logs, 2)
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = procs[0].wait(timeout=timeout + 60)
        took = time.monotonic() - stopped_at
    finally:
        stop_all(procs)
    text = rank_logs(logs, 2)[0]
    assert code == 7, text[-3000:]
    assert "lost contact with another process" in text and "unexpected error" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert took < timeout + 45, took
    assert (out / "checkpoint" / "state.pt").is_file()


DIFFERENT = {  # what rank 1 is started with on top of rank 0's command, and what the refusal must name
    "lora-rank": (lambda f: ["--lora-rank", 8], ["lora_rank: process 0 has 4, process 1 has 8"]),
    "everything-else": (lambda f: ["--checkpoint", f / "other.safetensors", "--prompts", f / "other-prompts.txt",
                                   "--learning-rate", "0.01", "--seed", 4, "--steps", 5],
                        ["base model (weights hash): process 0 has '", "data (content fingerprint): process 0 has "
                         "'PromptList ", "learning_rate: process 0 has 0.001, process 1 has 0.01",
                         "steps: process 0 has 3, process 1 has 5", "seed: process 0 has 3, process 1 has 4"]),
}


@pytest.mark.parametrize("case", list(DIFFERENT))
def test_processes_started_for_different_jobs_all_refuse_naming_what_differs(files, case):
    """Before any collective that a differing peer could derail (DDP's shape check, a longer loop):
    every process compares the base model, data and settings with process 0's and refuses (exit 2)."""
    from comfy_selfnpo import tiny_models

    if not (files / "other.safetensors").is_file():
        tiny_models.save_checkpoint(str(files / "other.safetensors"), "sd15", seed=1)
        (files / "other-prompts.txt").write_text("a green cone\n")
    extra, named = DIFFERENT[case]
    out, logs = files / f"differ-{case}", files / f"differ-{case}-logs"
    logs.mkdir()
    procs = start_ranks([base_args(files, out), base_args(files, out, *extra(files))], logs)
    try:
        codes = [proc.wait(timeout=240) for proc in procs]
    finally:
        stop_all(procs)
    for text, code in zip(rank_logs(logs, 2), codes):
        assert code == 2, text[-3000:]
        assert "not started for the same job" in text and "Traceback" not in text, text[-3000:]
        for words in named:
            assert words in text, (words, text[-3000:])
    assert not (out / "self_npo.safetensors").exists() and not (out / "checkpoint").exists()


@pytest.mark.parametrize("value", ["-5", "0", "nan"])
def test_a_dist_timeout_that_is_not_a_positive_number_is_refused(tmp_path, capsys, value):
    from cli_setup import run

    code, err = run(capsys, "--checkpoint", tmp_path / "x.safetensors", "--prompts", tmp_path / "p.txt",
                    "--dist-timeout", value, "--output", tmp_path / "out")
    assert code == 2 and f"--dist-timeout must be a positive number of seconds, got {value}" in err, err
    toml = tmp_path / "run.toml"
    toml.write_text(f"dist_timeout = {value}\n")  # TOML has nan too
    code, err = run(capsys, "--checkpoint", tmp_path / "x.safetensors", "--prompts", tmp_path / "p.txt",
                    "--config", toml, "--output", tmp_path / "out")
    assert code == 2 and "--dist-timeout must be a positive number of seconds" in err, err
    assert not (tmp_path / "out").exists()


def _raised(outer: BaseException, cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


def test_what_torch_distributed_raises_for_a_lost_peer_is_a_lost_process(monkeypatch):
    """The kinds torch.distributed raises and the words gloo/NCCL/the store use, in any case, also as
    the cause of another error; under torchrun only (a single process has no peer to lose)."""
    import torch.distributed as dist

    from comfy_selfnpo.training import cli

    lost = [dist.DistBackendError("NCCL error"), dist.DistNetworkError("Connection reset by peer"),
            dist.DistStoreError("wait timeout"), RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 20000ms"),
            RuntimeError("Connection closed by peer [127.0.0.1]:29500"), ConnectionResetError("Broken pipe"),
            _raised(ValueError("while averaging the loss"), RuntimeError("TIMED OUT"))]
    not_lost = [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("timed out"),
                _raised(KeyError("x"), RuntimeError("expected a tensor"))]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [cli._is_lost_process(e) for e in lost] == [True] * len(lost)
    assert [cli._is_lost_process(e) for e in not_lost] == [False] * len(not_lost)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not any(cli._is_lost_process(e) for e in lost)
