"""Start the real ComfyUI server (`main.py --cpu`) on 127.0.0.1 in a temporary base directory with
this pack in its `custom_nodes/`, talk to it over HTTP, and stop it by its PID."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# A test-only custom node that teaches the server's model detection the tiny checkpoint formats.
_TINY_REGISTRAR = '''
from comfy_selfnpo import tiny_models
tiny_models.register_tiny_model_configs()
NODE_CLASS_MAPPINGS = {}
'''


# Written only when no real torchvision is importable (CPU-only machines have no usable wheel):
# ComfyUI imports it at start-up although SD1.5/SDXL never use it. The server process then installs
# the pack's own stand-in (comfyui_env.install_torchvision_stand_in_if_missing) before anything else.
_SITECUSTOMIZE = """
import importlib.util
spec = importlib.util.spec_from_file_location("_selfnpo_comfyui_env", {path!r})
env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(env)
env.install_torchvision_stand_in_if_missing()
"""


def _real_torchvision_importable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True)
    return probe.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_root: Path, pack_root: Path, base_dir: Path):
        self.comfy_root, self.pack_root, self.base = comfy_root, pack_root, base_dir
        self.port = _free_port()
        self.log_path = base_dir / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        custom = self.base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        (custom / "comfy-selfnpo").symlink_to(self.pack_root, target_is_directory=True)
        registrar = custom / "zz_selfnpo_tiny_test_models"
        registrar.mkdir()
        (registrar / "__init__.py").write_text(_TINY_REGISTRAR)
        for sub in ("models/checkpoints", "models/loras", "models/self_npo", "input", "output", "user", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90.0) -> None:
        cmd = [sys.executable, str(self.comfy_root / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base),
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
               "--disable-auto-launch", "--disable-api-nodes"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if not _real_torchvision_importable():
            stand_in = self.base / "torchvision_stand_in"
            stand_in.mkdir(exist_ok=True)
            (stand_in / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(path=str(self.pack_root / "comfyui_env.py")))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stand_in), env.get("PYTHONPATH")]))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_root), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.read_log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        return json.loads(self.get_bytes(path))

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return r.read()

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from e

    def wait_for_history(self, prompt_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.read_log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()
