"""The shipped example workflows: they parse, match their generator, validate, and run end to end in
the real ComfyUI — through the executor, and once through the real HTTP server."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_exec import run_prompt, validate
from conftest import COMFYUI_ROOT, PACK_ROOT
from npo_files import kohya_state_dict, make_npo_offset, peft_state_dict, write
from server_harness import ComfyServer

WORKFLOWS = PACK_ROOT / "workflows"


def _load_builder():
    spec = importlib.util.spec_from_file_location("selfnpo_workflows_build", WORKFLOWS / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_builder()
graph = sys.modules[build.Graph.__module__]  # the graph module build.py imported
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))

# Only sizes and step counts are shrunk for the tiny models on a CPU; every other input runs as shipped.
SHRINK = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 4},
          "BasicScheduler": {"steps": 4}, "SelfNPOTrainTDFT": {"steps": 3, "save_every": 0, "preview_every": 0,
                                                 "overrides": "resolution = 64\ntrajectory_buffer = 2\nbatch_size = 1"}}


def _shrunk(api: dict) -> dict:
    api = copy.deepcopy(api)
    for node in api.values():
        node["inputs"].update(SHRINK.get(node["class_type"], {}))
    return api


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_stand_in_models(models_root: Path, tiny) -> None:
    """Tiny stand-ins under the exact file names the shipped workflows use, in a ComfyUI models/
    folder (checkpoints/, self_npo/, loras/)."""
    sd15 = tiny.save_checkpoint(str(models_root / "checkpoints" / build.SD15_CHECKPOINT), "sd15", seed=0)
    sdxl = tiny.save_checkpoint(str(models_root / "checkpoints" / build.SDXL_CHECKPOINT), "sdxl", seed=0)
    files = {
        build.SD15_SELFNPO: kohya_state_dict(make_npo_offset(sd15.model, seed=1), sd15.model),
        build.SDXL_SELFNPO: kohya_state_dict(make_npo_offset(sdxl.model, seed=2), sdxl.model),
        build.DIFFUSION_NPO_LORA: peft_state_dict(make_npo_offset(sd15.model, seed=3), sd15.model),
        "loras/" + build.STYLE_LORA: kohya_state_dict(make_npo_offset(sd15.model, seed=4), sd15.model),
    }
    for rel, tensors in files.items():
        write(str(models_root / rel), tensors)


@pytest.fixture
def model_files(tiny, comfy_dirs):
    write_stand_in_models(comfy_dirs["checkpoints"].parent, tiny)
    return comfy_dirs


def test_every_workflow_has_both_forms_and_matches_the_generator(comfy_registry):
    built = build.build_all(comfy_registry.NODE_CLASS_MAPPINGS, comfy_registry.NODE_DISPLAY_NAME_MAPPINGS)
    assert sorted(built) == NAMES and len(NAMES) == 4
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == NAMES
    for name, (ui, api) in built.items():
        assert _read_json(WORKFLOWS / f"{name}.json") == json.loads(build.dump(ui)), \
            f"workflows/{name}.json is stale: run workflows/build.py"
        assert _read_json(WORKFLOWS / "api" / f"{name}.json") == json.loads(build.dump(api)), name


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_a_consistent_graph_of_registered_nodes(comfy_registry, name):
    registry = comfy_registry.NODE_CLASS_MAPPINGS
    ui = _read_json(WORKFLOWS / f"{name}.json")
    api = _read_json(WORKFLOWS / "api" / f"{name}.json")
    assert ui["version"] == 0.4
    by_id = {n["id"]: n for n in ui["nodes"]}
    assert len(by_id) == len(ui["nodes"]) and ui["last_node_id"] == max(by_id)
    notes = [n for n in ui["nodes"] if n["type"] in graph.FRONTEND_ONLY]
    assert notes and all(len(n["widgets_values"][0]) > 80 for n in notes), "each workflow explains its knobs"
    for node in ui["nodes"]:
        if node["type"] in graph.FRONTEND_ONLY:
            continue
        assert node["type"] in registry, node["type"]
        cls = registry[node["type"]]
        widgets = [(n, o) for n, (k, o) in graph._input_specs(cls) if graph.is_widget_input(k)]
        expected_len = len(widgets) + sum(1 for _, o in widgets if o.get("control_after_generate"))
        assert len(node["widgets_values"]) == expected_len, node["type"]
        assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES)
    assert ui["last_link_id"] == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, link_type in ui["links"]:
        out = by_id[src]["outputs"][src_slot]
        inp = by_id[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == inp["type"] == link_type
        # the API form carries the same edge
        assert api[str(dst)]["inputs"][inp["name"]] == [str(src), src_slot]
    # and the same nodes with the same widget values
    assert set(api) == {str(i) for i, n in by_id.items() if n["type"] not in graph.FRONTEND_ONLY}
    for node_id, entry in api.items():
        node = by_id[int(node_id)]
        assert entry["class_type"] == node["type"]
        values = [v for v in node["widgets_values"] if v not in ("fixed",)]
        for key, value in entry["inputs"].items():
            if not isinstance(value, list):
                assert value in values, (name, node["type"], key)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_as_shipped(comfy_registry, model_files, name):
    valid, error, outputs, node_errors = validate(_read_json(WORKFLOWS / "api" / f"{name}.json"))
    assert valid, (error, node_errors)
    assert outputs


def _saved_images(history: dict, output_dir: Path) -> dict[str, np.ndarray]:
    images = {}
    for node_out in history["outputs"].values():
        for item in node_out.get("images", []):
            if item["type"] != "output":
                continue
            path = output_dir / item["subfolder"] / item["filename"]
            images[item["filename"]] = np.asarray(Image.open(path), dtype=np.float32)
    return images


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_executes_end_to_end(comfy_registry, model_files, name):
    _, history = run_prompt(_shrunk(_read_json(WORKFLOWS / "api" / f"{name}.json")))
    images = _saved_images(history, model_files["output"])
    assert images, history
    for filename, pixels in images.items():
        assert pixels.ndim == 3 and pixels.std() > 0, filename
    if name == "sd15_selfnpo_ksampler":
        npo = next(v for k, v in images.items() if k.startswith("sd15_npo"))
        plain = next(v for k, v in images.items() if k.startswith("sd15_plain_cfg"))
        assert np.abs(npo - plain).mean() > 0.5, "Self-NPO must change the image against plain CFG"
    if name == "train_selfnpo_lora_then_sample":
        saved = list(model_files["self_npo"].glob("*.safetensors"))
        assert saved, "the training node writes its weights into models/self_npo"


def test_workflow_runs_in_the_real_comfyui_server(tiny, tmp_path):
    server = ComfyServer(COMFYUI_ROOT, PACK_ROOT, tmp_path / "comfy")
    server.prepare()
    write_stand_in_models(server.base / "models", tiny)
    try:
        server.start()
        log = server.read_log()
        pack_lines = [line for line in log.splitlines() if "custom_nodes/comfy-selfnpo" in line]
        assert pack_lines and not any("IMPORT FAILED" in line for line in pack_lines), log
        info = server.get("/object_info/SelfNPOApply")
        assert "SelfNPOApply" in info
        # the UI-format workflows show up in ComfyUI's template browser under the pack's folder name
        assert sorted(server.get("/workflow_templates")["comfy-selfnpo"]) == NAMES
        api = _shrunk(_read_json(WORKFLOWS / "api" / "sd15_selfnpo_ksampler.json"))
        answer = server.post("/prompt", {"prompt": api})
        assert answer["node_errors"] == {}
        entry = server.wait_for_history(answer["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        images = _saved_images(entry, server.base / "output")
        assert len(images) == 2
        npo, plain = (images[k] for k in sorted(images))
        assert npo.shape == plain.shape == (64, 64, 3)
        assert np.abs(npo - plain).mean() > 0.5
    finally:
        server.stop()
    assert server.proc.poll() is not None, "the server must be stopped"
