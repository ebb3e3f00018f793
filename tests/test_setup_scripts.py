"""scripts/setup_env.sh: the demo's setup installs only what the demo needs; the test command adds the
test tools. Run for real with a stand-in interpreter in the venv that records every install it is
asked for (so nothing is downloaded), against the pinned ComfyUI cache the suite already uses."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import PACK_ROOT

RECORDING_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../installs.log"
"""


def _fake_venv(root: Path) -> Path:
    """A folder that setup_env.sh takes for an existing venv (and its registry-tools venv)."""
    for venv in (root, root / "registry-tools"):
        python = venv / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(RECORDING_PYTHON)
        python.chmod(0o755)
    return root


def _setup(venv: Path, profile: str) -> list[str]:
    env = {**os.environ, "SELFNPO_VENV": str(venv)}
    subprocess.run(["bash", "scripts/setup_env.sh", profile], cwd=PACK_ROOT, env=env, check=True,
                   capture_output=True, timeout=120)
    lines = []
    for log in (venv / "installs.log", venv / "registry-tools" / "installs.log"):
        lines += log.read_text().splitlines() if log.is_file() else []
    return lines


def test_demo_setup_installs_only_torch_comfyui_runtime_and_the_pack(tmp_path):
    installs = _setup(_fake_venv(tmp_path / "venv"), "demo")
    assert any("torch==" in line for line in installs)
    assert any("scripts/comfyui-runtime.txt" in line for line in installs)
    assert any(line.endswith("install --quiet -e .") for line in installs)
    for test_only in ("[test", "comfyui-server.txt", "registry-tools.txt", "pytest", "diffusers"):
        assert not any(test_only in line for line in installs), (test_only, installs)


def test_test_setup_adds_the_test_tools_once_and_rerunning_installs_nothing(tmp_path):
    venv = _fake_venv(tmp_path / "venv")
    demo = _setup(venv, "demo")
    both = _setup(venv, "test")
    added = both[len(demo):]
    assert not any("torch==" in line for line in added), "the runtime part must not be installed twice"
    assert any("scripts/comfyui-server.txt" in line for line in added)
    assert any('-e .[test,bench,tensorboard]' in line for line in added)
    assert any("scripts/registry-tools.txt" in line for line in added)
    assert _setup(venv, "test") == both, "a second run with unchanged package lists installs nothing"


def test_setup_refuses_an_unknown_profile(tmp_path):
    result = subprocess.run(["bash", "scripts/setup_env.sh", "everything"], cwd=PACK_ROOT,
                            env={**os.environ, "SELFNPO_VENV": str(tmp_path / "venv")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "usage" in result.stderr
    assert not (tmp_path / "venv").exists(), "nothing is created for a bad profile"
