"""The shipped example workflows: the templates in example_workflows/ (UI format, with thumbnails and
model download links) and their API twins in workflows/api/ parse, match their generator, validate,
and run end to end in the real ComfyUI — through the executor, and once through the real HTTP
server, whose template browser lists them."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_exec import run_prompt, validate
from conftest import COMFYUI_ROOT, PACK_ROOT
from npo_files import kohya_state_dict, make_npo_offset, peft_state_dict, write
from server_harness import ComfyServer

def _load_builder():
    spec = importlib.util.spec_from_file_location("selfnpo_workflows_build", PACK_ROOT / "workflows" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_builder()
graph = sys.modules[build.Graph.__module__]  # the graph module build.py imported
GRAPHS = {g.name: g for g in build.graphs()}
NAMES = sorted(GRAPHS)


def ui_path(name: str) -> Path:
    return build.UI_DIR / f"{GRAPHS[name].title}.json"


def api_path(name: str) -> Path:
    return build.API_DIR / f"{name}.json"

# Only sizes and step counts are shrunk for the tiny models on a CPU; every other input runs as shipped.
SHRINK = {"EmptyLatentImage": {"width": 64, "height": 64}, "EmptySD3LatentImage": {"width": 64, "height": 64},
          "EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 5}, "KSampler": {"steps": 4},
          "BasicScheduler": {"steps": 4}, "SelfNPOTrainTDFT": {"steps": 3, "save_every": 0, "preview_every": 0,
                                                 "overrides": "resolution = 64\ntrajectory_buffer = 2\nbatch_size = 1"}}


def _shrunk(api: dict) -> dict:
    api = copy.deepcopy(api)
    for node in api.values():
        node["inputs"].update(SHRINK.get(node["class_type"], {}))
    return api


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_stand_in_models(models_root: Path, tiny, leave_out: frozenset[str] = frozenset()) -> None:
    """Tiny stand-ins under the exact file names the shipped workflows use, in a ComfyUI models/
    folder (checkpoints/, self_npo/, loras/); the file names in `leave_out` are not written."""
    sd15 = tiny.save_checkpoint(str(models_root / "checkpoints" / build.SD15_CHECKPOINT), "sd15", seed=0)
    sdxl = tiny.save_checkpoint(str(models_root / "checkpoints" / build.SDXL_CHECKPOINT), "sdxl", seed=0)
    if build.SDXL_CHECKPOINT in leave_out:
        (models_root / "checkpoints" / build.SDXL_CHECKPOINT).unlink()
    files = {
        build.SD15_SELFNPO: kohya_state_dict(make_npo_offset(sd15.model, seed=1), sd15.model),
        build.SDXL_SELFNPO: kohya_state_dict(make_npo_offset(sdxl.model, seed=2), sdxl.model),
        build.DIFFUSION_NPO_LORA: peft_state_dict(make_npo_offset(sd15.model, seed=3), sd15.model),
        "loras/" + build.STYLE_LORA: kohya_state_dict(make_npo_offset(sd15.model, seed=4), sd15.model),
    }
    for rel, tensors in files.items():
        if Path(rel).name not in leave_out:
            write(str(models_root / rel), tensors)
    _split_file_stand_ins(models_root, tiny)


def _split_file_stand_ins(models_root: Path, tiny) -> None:
    """Wan 2.1 and Qwen-Image as split files (diffusion model, text encoder, VAE) under the shipped
    names, and a Self-NPO LoRA for the Qwen-Image one (kohya names ComfyUI maps on any model)."""
    for kind, names in (("wan21", (build.WAN_UNET, build.WAN_TEXT_ENCODER, build.WAN_VAE)),
                        ("qwen_image", (build.QWEN_UNET, build.QWEN_TEXT_ENCODER, build.QWEN_VAE))):
        files = tiny.save_files(models_root, kind, seed=0)
        for path, name in zip((files.diffusion_models["model"], files.text_encoders[0], files.vae), names):
            path.rename(path.with_name(name))
        if kind == "qwen_image":
            offset = make_npo_offset(files.built.model, seed=5)
            lora = {}
            for key, (up, down, alpha) in offset.factors.items():
                stem = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
                lora.update({f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down,
                             f"{stem}.alpha": torch.tensor(alpha)})
            write(str(models_root / build.QWEN_SELFNPO), lora)


@pytest.fixture
def model_files(tiny, comfy_dirs):
    write_stand_in_models(comfy_dirs["checkpoints"].parent, tiny)
    return comfy_dirs


def test_every_workflow_has_both_forms_and_matches_the_generator(comfy_registry):
    built = build.build_all(comfy_registry.NODE_CLASS_MAPPINGS, comfy_registry.NODE_DISPLAY_NAME_MAPPINGS)
    assert sorted(built) == NAMES and len(NAMES) == 6
    # nothing else in the two folders: the template browser lists every .json of example_workflows/
    assert sorted(p.name for p in build.UI_DIR.glob("*.json")) == sorted(ui_path(n).name for n in NAMES)
    assert sorted(p.name for p in build.API_DIR.glob("*.json")) == sorted(api_path(n).name for n in NAMES)
    assert not list((PACK_ROOT / "workflows").glob("*.json")), "ComfyUI would list workflows/*.json as templates too"
    for name, (_, ui, api) in built.items():
        assert _read_json(ui_path(name)) == json.loads(build.dump(ui)), f"{ui_path(name)} is stale: run workflows/build.py"
        assert _read_json(api_path(name)) == json.loads(build.dump(api)), f"{api_path(name)} is stale"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_a_consistent_graph_of_registered_nodes(comfy_registry, name):
    registry = comfy_registry.NODE_CLASS_MAPPINGS
    ui = _read_json(ui_path(name))
    api = _read_json(api_path(name))
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
def test_template_has_a_thumbnail_download_links_and_says_what_to_do_first(comfy_registry, name):
    from PIL import Image

    import folder_paths

    ui = _read_json(ui_path(name))
    with Image.open(ui_path(name).with_suffix(".jpg")) as thumbnail:  # the template browser's naming
        assert thumbnail.format == "JPEG" and 320 <= thumbnail.width <= 1024 and thumbnail.height >= 100
    assert ui_path(name).with_suffix(".jpg").stat().st_size < 100 * 1024
    assert ui["extra"]["comfy-selfnpo"]["title"] == GRAPHS[name].title == ui_path(name).stem
    assert len(GRAPHS[name].title) <= 32, "the template browser's cards cut longer titles"
    # every model file a loader widget names has a download link the missing-models dialog accepts
    # (Hugging Face, .safetensors, a model folder ComfyUI knows), on the node (properties.models:
    # the dialog keeps those whose name is a widget value) or, where the widget value carries a
    # folder prefix, on the workflow
    listed = []
    for node in ui["nodes"]:
        for model in node["properties"].get("models", []):
            assert model["name"] in node["widgets_values"], (node["type"], model)
            listed.append((model["directory"], model["name"]))
    for model in ui.get("models", []):
        assert any(f"{model['directory']}/{model['name']}" in n["widgets_values"] for n in ui["nodes"]), model
        listed.append((model["directory"], model["name"]))
    for model in [m for n in ui["nodes"] for m in n["properties"].get("models", [])] + ui.get("models", []):
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
        assert model["directory"] in folder_paths.folder_names_and_paths and model["name"].endswith(".safetensors")
    loaders = {"CheckpointLoaderSimple": "checkpoints", "UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders",
               "VAELoader": "vae"}
    loaded = [(loaders[n["type"]], n["widgets_values"][0]) for n in ui["nodes"] if n["type"] in loaders]
    assert loaded and all(item in listed for item in loaded)
    # a workflow that loads Self-NPO weights the user has to train says so first
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] in graph.FRONTEND_ONLY]
    needs_training = any(str(v).startswith("self_npo/") for n in ui["nodes"] for v in n["widgets_values"])
    assert needs_training == any("**Train first.**" in note for note in notes), name
    for node in ui["nodes"]:  # no two nodes overlap (title bars included)
        for other in ui["nodes"]:
            if other["id"] > node["id"]:
                assert not _overlap(node, other), (name, node["id"], other["id"])


def _overlap(a: dict, b: dict) -> bool:
    def box(n):
        return n["pos"][0], n["pos"][1] - graph.TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]

    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_as_shipped(comfy_registry, model_files, name):
    valid, error, outputs, node_errors = validate(_read_json(api_path(name)))
    assert valid, (error, node_errors)
    assert outputs


VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")


def _saved_images(history: dict, output_dir: Path) -> dict[str, np.ndarray]:
    """filename -> pixels: [H, W, C] for an image, [F, H, W, C] for a saved video."""
    images = {}
    for node_out in history["outputs"].values():
        for item in node_out.get("images", []):
            if item["type"] != "output":
                continue
            if item["filename"].endswith(VIDEO_SUFFIXES):
                images[item["filename"]] = _video_frames(output_dir / item["subfolder"] / item["filename"])
                continue
            path = output_dir / item["subfolder"] / item["filename"]
            images[item["filename"]] = np.asarray(Image.open(path), dtype=np.float32)
    return images


def _video_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(np.float32)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_executes_end_to_end(comfy_registry, model_files, name):
    _, history = run_prompt(_shrunk(_read_json(api_path(name))))
    images = _saved_images(history, model_files["output"])
    assert images, history
    for filename, pixels in images.items():
        assert pixels.ndim == (4 if filename.endswith(VIDEO_SUFFIXES) else 3) and pixels.std() > 0, filename
    if name == "wan21_t2v_train_selfnpo_then_sample":  # two clips of 5 frames (shrunk from 33)
        videos = {k.split("_0")[0]: v for k, v in images.items() if k.endswith(VIDEO_SUFFIXES)}
        assert sorted(videos) == ["wan_npo", "wan_plain_cfg"] and videos["wan_npo"].shape[0] == 5
        assert np.abs(videos["wan_npo"] - videos["wan_plain_cfg"]).mean() > 0.5, "Self-NPO must change the clip"
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
        # the templates show up in ComfyUI's template browser under the pack's folder name, by title,
        # each served with its thumbnail from the URLs the browser uses
        titles = sorted(server.get("/workflow_templates")["comfy-selfnpo"])
        assert titles == sorted(g.title for g in GRAPHS.values())
        for title in titles:
            base = "/api/workflow_templates/comfy-selfnpo/" + urllib.parse.quote(title)
            assert server.get(base + ".json") == _read_json(build.UI_DIR / f"{title}.json")
            assert server.get_bytes(base + ".jpg") == (build.UI_DIR / f"{title}.jpg").read_bytes()
        api = _shrunk(_read_json(api_path("sd15_selfnpo_ksampler")))
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


SDXL_SIZE_EMBEDDINGS = 6 * 256  # SDXL's `y`: pooled output, then six 256-wide size/crop embeddings (not zero)


@pytest.mark.parametrize("residency", ["auto", "separate"])
def test_sdxl_template_runs_the_negative_branch_on_zeroed_conditioning(comfy_registry, model_files, monkeypatch,
                                                                        residency):
    """As the authors sample SDXL (force_zeros_for_empty_prompt), and as its negative model is trained: what
    the negative model receives is zero text embeddings and a zero pooled part of `y`."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from comfy_selfnpo.npo.residency import NEGATIVE_SLOTS

    api = _shrunk(_read_json(api_path("sdxl_selfnpo_guider")))
    guider = next(n for n in api.values() if n["class_type"] == "SelfNPOCFGGuider")
    assert api[guider["inputs"]["negative"][0]]["class_type"] == "ConditioningZeroOut"
    guider["inputs"]["residency"] = residency
    calls = []
    forward = UNetModel.forward

    def recording_forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kw):
        calls.append(dict(module=self, context=context.clone(), y=y.clone(),
                          slots=list(transformer_options["cond_or_uncond"]),
                          negative_slots=transformer_options.get(NEGATIVE_SLOTS, ())))
        return forward(self, x, timesteps, context, y, control, transformer_options, **kw)

    monkeypatch.setattr(UNetModel, "forward", recording_forward)
    run_prompt(api)
    rows = {0: [], 1: []}  # CFG slot (0 cond, 1 uncond) -> (module, context rows, y rows)
    for call in calls:
        chunk = call["context"].shape[0] // len(call["slots"])
        for i, slot in enumerate(call["slots"]):
            part = slice(i * chunk, (i + 1) * chunk)
            rows[slot].append((call["module"], call["context"][part], call["y"][part]))
            if slot == 1 and residency == "auto":  # batched: the uncond rows are the negative model's
                assert call["negative_slots"] == (1,)
    assert len(rows[1]) == len(rows[0]) == 4  # every step evaluated the negative branch
    if residency == "separate":
        assert {id(m) for m, _, _ in rows[1]}.isdisjoint({id(m) for m, _, _ in rows[0]})
    for (_, context, y), (_, cond_context, cond_y) in zip(rows[1], rows[0]):
        pooled, sizes = y[:, :-SDXL_SIZE_EMBEDDINGS], y[:, -SDXL_SIZE_EMBEDDINGS:]
        assert pooled.shape[1] > 0 and torch.count_nonzero(context) == 0 and torch.count_nonzero(pooled) == 0
        assert torch.equal(sizes, cond_y[:, -SDXL_SIZE_EMBEDDINGS:]) and torch.count_nonzero(sizes) > 0
        assert torch.count_nonzero(cond_context) > 0 and torch.count_nonzero(cond_y[:, :-SDXL_SIZE_EMBEDDINGS]) > 0
