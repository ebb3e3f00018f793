"""Maintainer check (not part of the test suite): the example workflows in ComfyUI's real frontend.

Starts ComfyUI (`main.py --cpu`, 127.0.0.1, a temporary base directory) with tiny stand-in models
under the file names the workflows use, and drives the frontend in headless Chromium
(load_in_frontend.js). It checks that

* the template browser lists every file of example_workflows/ under the pack's name, and every
  thumbnail is served (no 404) and shows in the browser;
* every template loads without console errors or failed requests, and the frontend's own UI->API
  conversion (`app.graphToPrompt()`) equals the committed API twin in workflows/api/;
* every node is sized to its content: the saved size is what the frontend computes for it;
* the missing-models dialog offers the download links of `properties.models` (the stand-ins of the
  SDXL checkpoint and of the authors' Diffusion-NPO release are left out on purpose for this).

With --update it also writes the thumbnails (example_workflows/<template>.jpg) and the README
screenshot (docs/images/workflow_in_comfyui.png) from what the browser shows (after a change to the
graphs, run it twice: the second run checks the new thumbnails).

Needs, besides .venv: Debian's `chromium` (apt-get install chromium) and `npm install` in this folder.

    .venv/bin/python scripts/frontend_check/check.py [--update]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402,F401  boots ComfyUI in CPU mode and imports the pack
from conftest import COMFYUI_ROOT, PACK_ROOT  # noqa: E402
from server_harness import ComfyServer  # noqa: E402
from test_workflows import build, write_stand_in_models  # noqa: E402

from comfy_selfnpo import tiny_models  # noqa: E402

MODULE = "comfy-selfnpo"  # the custom_nodes folder name the harness gives the pack
LEFT_OUT = {build.SDXL_CHECKPOINT: "checkpoints", build.DIFFUSION_NPO_LORA.split("/", 1)[1]: "loras"}
README_SCREENSHOT = ROOT / "docs" / "images" / "workflow_in_comfyui.png"
README_TEMPLATE = "sd15_selfnpo_ksampler"
THUMBNAIL_WIDTH = 640
# Console lines this machine produces whatever the workflow: no core template index here (a separate
# package), and no internet for the missing-models dialog's look-up of the download size.
EXPECTED_OFFLINE = ("Error loading core workflow templates", "Error loading fuse options", "Failed to load resource",
                    "violates the following Content Security Policy", "Refused to connect because it violates",
                    "Error fetching file size",
                    "[MaskEditor] ComfyApp.open_maskeditor is deprecated")  # the frontend's own notice
OVERSIZE = 1.25  # a node may be this much larger than its content needs


def run_frontend(work: Path) -> dict:
    server = ComfyServer(COMFYUI_ROOT, PACK_ROOT, work / "comfy")
    server.prepare()
    settings = server.base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    # no welcome dialog, no minimap over the graph, text drawn at any zoom (for the pictures)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "LiteGraph.Canvas.MinFontSizeForLOD": 0}))
    tiny_models.register_tiny_model_configs()
    write_stand_in_models(server.base / "models", tiny_models, leave_out=set(LEFT_OUT))
    out = work / "frontend"
    out.mkdir()
    try:
        server.start()
        run = subprocess.run(["node", str(HERE / "load_in_frontend.js"), server.url, MODULE, str(out)],
                             cwd=HERE, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise SystemExit(f"the browser run failed:\n{run.stdout}\n{run.stderr}")
    finally:
        server.stop()
    return json.loads((out / "results.json").read_text())


def check(results: dict) -> list[str]:
    problems = []
    graphs = {g.title: g for g in build.graphs()}
    if sorted(results["names"]) != sorted(graphs):
        problems.append(f"template browser lists {results['names']}, expected {sorted(graphs)}")
    cards = {t["template"]: t["loaded"] for t in results["browser"]["thumbnails"]}
    problems += [f"template browser: no card for {title}" for title in graphs if title not in cards]
    problems += [f"template browser: the thumbnail of {title} does not show" for title, ok in cards.items() if not ok]
    problems += [f"failed request: {r}" for r in results["failedRequests"] if "/workflow_templates/" in r]
    problems += [f"at start-up: {line}" for line in results["startupLogs"] if not expected_offline(line)]
    for title, result in results["templates"].items():
        graph = graphs[title]
        api = json.loads((build.API_DIR / f"{graph.name}.json").read_text())
        if result["prompt"] != api:
            problems.append(f"{title}: graphToPrompt differs from workflows/api/{graph.name}.json")
        if result["thumbnail"] != {"status": 200, "type": "image/jpeg"}:
            problems.append(f"{title}: thumbnail {result['thumbnail']}")
        problems += [f"{title}: {line}" for line in result["logs"] if not expected_offline(line)]
        problems += [f"{title}: node {n['id']} {n['title']!r}: {p}" for n in result["nodes"] for p in size_problems(n)]
        expected_missing = sorted(f"{folder} / {name}" for model in graph.all_models()
                                  for name, folder in LEFT_OUT.items() if model.name == name)
        if sorted(line.split("\n")[0].strip() for line in result["missingModels"]) != expected_missing:
            problems.append(f"{title}: missing-models dialog shows {result['missingModels']}, "
                            f"expected {expected_missing}")
    return problems


def expected_offline(line: str) -> bool:
    return any(text in line for text in EXPECTED_OFFLINE)


def size_problems(node: dict) -> list[str]:
    """The saved size shows everything (and the frontend keeps it), without much empty space."""
    (width, height), need = node["saved"], node["need"]
    out = []
    if width < node["computed"][0] - 1 or height < node["computed"][1] - 1:
        out.append(f"saved size {width}x{height} is below the frontend's minimum {[round(c) for c in node['computed']]}")
    content_width = max(need["title"], need["widgets"])
    if width < content_width:
        out.append(f"{width} px wide, its title or a widget value needs {content_width:.0f}")
    elif width > OVERSIZE * max(content_width, node["computed"][0]) and not need["text"]:  # text wraps
        out.append(f"{width} px wide, its content needs {max(content_width, node['computed'][0]):.0f}")
    largest = max((text["content"] for text in need["text"]), default=0)
    for text in need["text"]:  # the frontend gives a node's text boxes equal shares of its height
        if text["content"] > text["box"] + 1:
            out.append(f"text of {text['name']!r} needs {text['content']:.0f} px, its box is {text['box']:.0f}")
        elif text["box"] > OVERSIZE * largest + 30:
            out.append(f"box of {text['name']!r} is {text['box']:.0f} px for {text['content']:.0f} px of text")
    return out


def update_images(shots: Path) -> None:
    from PIL import Image

    for graph in build.graphs():
        with Image.open(shots / f"{graph.title}.canvas.png") as shot:
            image = shot.convert("RGB")
        height = round(image.height * THUMBNAIL_WIDTH / image.width)
        image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(
            build.UI_DIR / f"{graph.title}.jpg", quality=82, optimize=True)
        if graph.name == README_TEMPLATE:
            with Image.open(shots / f"{graph.title}.png") as shot:
                shot.convert("RGB").save(README_SCREENSHOT, optimize=True)
    for path in sorted(build.UI_DIR.glob("*.jpg")) + [README_SCREENSHOT]:
        print("wrote", path.relative_to(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="write the thumbnails and the README screenshot")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="selfnpo-frontend-"))
    results = run_frontend(work)
    for title, result in results["templates"].items():
        print(f"{title:55s} nodes {len(result['nodes']):3d}  missing models {len(result['missingModels'])}  "
              f"console lines {len(result['logs'])}")
    problems = check(results)
    for line in problems:
        print("PROBLEM:", line[:400])
    if options.update:
        update_images(work / "frontend")
    print(f"screenshots and results.json in {work / 'frontend'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
