"""Maintainer check (not part of the test suite): open every UI-format workflow in ComfyUI's real
frontend, in headless Chromium, and compare the frontend's own UI->API conversion
(`app.graphToPrompt()`) with the committed API-format file. Also reports any console error.

Needs, besides .venv: Debian's `chromium` and `npm install playwright-core` in this folder.

    .venv/bin/python scripts/frontend_check/check.py

It starts ComfyUI (`main.py --cpu`, 127.0.0.1, temporary base directory) with tiny stand-ins under
the file names the workflows use, exactly as tests/test_workflows.py does.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402  boots ComfyUI in CPU mode and imports the pack
from conftest import COMFYUI_ROOT, PACK_ROOT  # noqa: E402
from server_harness import ComfyServer  # noqa: E402
from test_workflows import write_stand_in_models  # noqa: E402

from comfy_selfnpo import tiny_models  # noqa: E402


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="selfnpo-frontend-"))
    server = ComfyServer(COMFYUI_ROOT, PACK_ROOT, work / "comfy")
    server.prepare()
    tiny_models.register_tiny_model_configs()
    write_stand_in_models(server.base / "models", tiny_models)
    files = sorted(str(p) for p in (ROOT / "workflows").glob("*.json"))
    results_path = work / "results.json"
    env = dict(os.environ, RESULTS_JSON=str(results_path), SCREENSHOT_DIR=str(work))
    try:
        server.start()
        run = subprocess.run(["node", str(HERE / "load_in_frontend.js"), server.url, *files],
                             cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            print(run.stdout, run.stderr)
            return 1
    finally:
        server.stop()
    failures = 0
    for path, result in json.loads(results_path.read_text()).items():
        api = json.loads((Path(path).parent / "api" / Path(path).name).read_text())
        same = result["prompt"] == api
        failures += (not same) + len(result["logs"])
        print(f"{Path(path).name:45s} nodes {result['nodes']:3d}  graphToPrompt == api: {same}  "
              f"console errors: {len(result['logs'])}")
        for line in result["logs"]:
            print("   ", line[:300])
    print(f"screenshots in {work}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
