"""The pack installs, ComfyUI imports it, and the tiny models behave like real ComfyUI models."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import comfy.sd
from conftest import COMFYUI_ROOT, PACK_ROOT


def test_comfyui_is_the_pinned_commit_or_an_explicit_override():
    marker = COMFYUI_ROOT / ".comfyui-commit"
    if "COMFYUI_PATH" not in os.environ:
        assert marker.read_text().strip() == "8ad38d2073b019a204f730182dcf5456fb260858"
    import comfy.samplers
    assert Path(comfy.samplers.__file__).resolve().is_relative_to(COMFYUI_ROOT)


def test_comfyui_loader_imports_the_pack_and_registers_every_node(comfy_registry, caplog):
    nodes = comfy_registry
    from comfy_selfnpo.nodes import NODE_ID_PREFIX, load_node_classes

    with caplog.at_level(logging.WARNING):
        ok = asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
    assert ok
    assert not [r for r in caplog.records if "IMPORT FAILED" in r.getMessage() or "Cannot import" in r.getMessage()]
    ids = [cls.GET_SCHEMA().node_id for cls in load_node_classes()]
    assert sorted(ids) == ["SelfNPOApply", "SelfNPOCFGGuider", "SelfNPONegativeModelLoader", "SelfNPOTrainTDFT"]
    for node_id in ids:
        assert node_id.startswith(NODE_ID_PREFIX)
        assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    import folder_paths
    assert folder_paths.get_folder_paths("self_npo")  # the pack's models folder is registered


def _load_extra_model_paths(yaml_path: Path) -> None:
    """ComfyUI's own reader of extra_model_paths.yaml (`utils/extra_config.py`, loaded by path: after
    `import nodes` a bare `import utils` finds comfy/utils.py)."""
    spec = importlib.util.spec_from_file_location("comfyui_extra_config", COMFYUI_ROOT / "utils" / "extra_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.load_extra_path_config(str(yaml_path))


@pytest.mark.parametrize("yaml_first", [True, False], ids=["yaml-then-pack", "pack-then-yaml"])
def test_extra_model_paths_entry_adds_to_models_self_npo(tmp_path, monkeypatch, yaml_first):
    import folder_paths

    from comfy_selfnpo.model_folders import self_npo_output_dir
    from comfy_selfnpo.nodes import SelfNPOExtension
    from comfy_selfnpo.nodes.negative_model import list_npo_files

    models, shared = tmp_path / "models", tmp_path / "team" / "npo"
    for folder, name in ((models / "self_npo", "own.safetensors"), (shared, "shared.safetensors")):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"{}")
    (shared / "notes.txt").write_text("not a model")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text("team:\n  base_path: team\n  self_npo: npo\n")  # relative to the yaml file
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    folder_paths.folder_names_and_paths.pop("self_npo", None)

    steps = [lambda: _load_extra_model_paths(config), lambda: asyncio.run(SelfNPOExtension().on_load())]
    for step in steps if yaml_first else steps[::-1]:  # the server reads the yaml before loading packs
        step()
    asyncio.run(SelfNPOExtension().on_load())  # loading twice changes nothing
    folder_paths.filename_list_cache.clear()
    assert folder_paths.get_folder_paths("self_npo") == [str(models / "self_npo"), str(shared)]
    assert folder_paths.get_filename_list("self_npo") == ["own.safetensors", "shared.safetensors"]
    assert list_npo_files()[:2] == ["self_npo/own.safetensors", "self_npo/shared.safetensors"]
    assert self_npo_output_dir() == str(models / "self_npo")  # new weights go to the default folder


def _encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def _ksample(model, clip, seed, steps=8, cfg=4.0, size=8):
    import nodes

    latent = {"samples": torch.zeros(1, 4, size, size)}
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal",
                                   _encode(clip, "a red cube"), _encode(clip, ""), latent)
    return out["samples"]


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl", "flow"])
def test_tiny_models_sample_deterministically_through_ksampler(tiny, kind):
    ckpt = tiny.build_checkpoint(kind, seed=3)
    first = _ksample(ckpt.model, ckpt.clip, seed=11)
    again = _ksample(ckpt.model, ckpt.clip, seed=11)
    other_seed = _ksample(ckpt.model, ckpt.clip, seed=12)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert (first - other_seed).abs().max() > 1e-3
    # a rebuild from the same seed is the same model, a different seed a different one
    assert torch.equal(first, _ksample(tiny.build_checkpoint(kind, seed=3).model, ckpt.clip, seed=11))
    assert not torch.equal(first, _ksample(tiny.build_checkpoint(kind, seed=4).model, ckpt.clip, seed=11))
    image = ckpt.vae.decode(first)
    assert image.shape == (1, 64, 64, 3)


def test_ensure_comfyui_inside_a_running_comfyui_returns_its_root():
    from comfy_selfnpo.comfyui_env import ensure_comfyui

    assert ensure_comfyui() == COMFYUI_ROOT  # comfy is a namespace package here: no __file__


def test_tiny_model_prediction_types(tiny):
    from comfy.model_base import ModelType

    expected = {"sd15": ModelType.EPS, "sd2": ModelType.V_PREDICTION, "sdxl": ModelType.EPS, "flow": ModelType.FLOW}
    for kind, model_type in expected.items():
        assert tiny.build_model(kind).model.model_type == model_type
    assert tiny.build_model("sdxl").model.adm_channels == tiny.SDXL_POOLED_DIM + 6 * 256


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_tiny_checkpoint_round_trips_through_comfyui_loaders(tiny, comfy_registry, comfy_dirs, kind):
    path = comfy_dirs["checkpoints"] / f"tiny_{kind}.safetensors"
    built = tiny.save_checkpoint(str(path), kind, seed=5)
    reference = _ksample(built.model, built.clip, seed=7)

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), te_model_options={"dtype": torch.float32})
    assert type(model.model.model_config) is tiny.TINY_CONFIGS[kind]
    assert model.model.model_type == built.model.model.model_type
    assert torch.equal(_ksample(model, clip, seed=7), reference)
    assert torch.equal(vae.decode(reference), built.vae.decode(reference))

    # the node users wire up loads the same file (its text encoder in ComfyUI's CPU default, fp16)
    loader = comfy_registry.NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]()
    node_model, node_clip, node_vae = loader.load_checkpoint(path.name)
    assert torch.equal(_ksample(node_model, clip, seed=7), reference)
    node_cond = node_clip.encode_from_tokens(node_clip.tokenize("a red cube"))
    ref_cond = built.clip.encode_from_tokens(built.clip.tokenize("a red cube"))
    torch.testing.assert_close(node_cond.float(), ref_cond, rtol=2e-2, atol=2e-2)


def test_import_is_cheap_and_does_not_shadow_comfyui_nodes():
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(PACK_ROOT.parent)!r})
        spec = importlib.util.spec_from_file_location("comfy_selfnpo", {str(PACK_ROOT / '__init__.py')!r},
                                                      submodule_search_locations=[{str(PACK_ROOT)!r}])
        mod = importlib.util.module_from_spec(spec); sys.modules["comfy_selfnpo"] = mod; spec.loader.exec_module(mod)
        assert "torch" not in sys.modules and "comfy" not in sys.modules, "import must stay cheap"
        sys.path.insert(0, {str(COMFYUI_ROOT)!r})
        origin = importlib.util.find_spec("nodes").origin  # resolve without running ComfyUI's import
        assert origin == {str(COMFYUI_ROOT / 'nodes.py')!r}, origin
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_pip_install_in_a_fresh_venv_exposes_the_cli_and_no_top_level_modules(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # --no-deps: the dependencies are checked from the metadata below instead of installing torch
    # again; the build backend (setuptools>=64) comes from the package index as for any user.
    install = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps",
                              "-e", str(PACK_ROOT)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    cli = subprocess.run([str(venv / "bin" / "comfy-selfnpo-train"), "--help"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "usage: comfy-selfnpo-train" in cli.stdout
    probe = textwrap.dedent("""
        import importlib.util, importlib.metadata as md
        for name in ("nodes", "training", "npo", "utils", "tests", "bench"):
            assert importlib.util.find_spec(name) is None, name + " leaked as a top-level module"
        import comfy_selfnpo, comfy_selfnpo.training.cli
        import re
        reqs = md.requires("comfy-selfnpo")
        base = sorted(re.split(r"[<>=!~;\\s]", r)[0] for r in reqs if "extra ==" not in r)
        bench = sorted(re.split(r"[<>=!~;\\s]", r)[0] for r in reqs if 'extra == "bench"' in r)
        print(",".join(base), ",".join(bench))
    """)
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    # runtime: no diffusers, no einops, no scikit-learn (the bench extra's: the authors' loop and the
    # digits data of bench/quality.py; einops the pack never imports)
    assert out.stdout.split() == ["safetensors,tomli,torch,tqdm", "diffusers,scikit-learn"]


def test_missing_comfyui_gives_instructions(tmp_path):
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("comfyui_env", {str(PACK_ROOT / 'comfyui_env.py')!r})
        env = importlib.util.module_from_spec(spec); spec.loader.exec_module(env)
        try:
            env.find_comfyui()
        except env.ComfyUINotFound as e:
            print(e)
    """)
    environ = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    environ["XDG_CACHE_HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)
    assert "ComfyUI was not found" in out.stdout
    assert str(tmp_path / "comfy-selfnpo" / "ComfyUI-8ad38d20") in out.stdout
    assert "COMFYUI_PATH" in out.stdout and "scripts/setup_comfyui.sh" in out.stdout

    environ["COMFYUI_PATH"] = str(COMFYUI_ROOT)
    found = subprocess.run([sys.executable, "-c", code.replace("env.find_comfyui()", "print(env.find_comfyui())")],
                           capture_output=True, text=True, env=environ)
    assert found.stdout.strip() == str(COMFYUI_ROOT)


def test_setup_script_reports_a_bad_source_and_keeps_an_existing_cache(tmp_path):
    script = PACK_ROOT / "scripts" / "setup_comfyui.sh"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), COMFYUI_GIT=str(tmp_path / "no-such-repo"))
    bad = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "Could not get ComfyUI commit 8ad38d2073b019a204f730182dcf5456fb260858" in bad.stderr
    assert not list((tmp_path / "comfy-selfnpo").iterdir())  # no half-written tree left behind

    tree = tmp_path / "comfy-selfnpo" / "ComfyUI-8ad38d20"
    (tree / "comfy").mkdir(parents=True)
    (tree / "comfy" / "samplers.py").write_text("# present\n")
    (tree / "nodes.py").write_text("# present\n")
    ok = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and str(tree) in ok.stdout
    assert (tree / "nodes.py").read_text() == "# present\n"


def test_a_node_module_that_fails_to_import_is_skipped_and_the_rest_register(monkeypatch, caplog, tmp_path):
    from comfy_selfnpo import nodes as pack_nodes

    before = [cls.GET_SCHEMA().node_id for cls in pack_nodes.load_node_classes()]
    monkeypatch.setattr(pack_nodes, "NODE_MODULES", ["_selfnpo_missing_optional_dependency", *pack_nodes.NODE_MODULES])
    with caplog.at_level(logging.WARNING, logger="comfy_selfnpo"):
        after = [cls.GET_SCHEMA().node_id for cls in pack_nodes.load_node_classes()]
    assert after == before
    messages = [r.getMessage() for r in caplog.records]
    assert any("_selfnpo_missing_optional_dependency" in m and "unavailable" in m for m in messages), messages


def test_comfyui_and_diffusers_import_together_in_one_process():
    # ComfyUI needs a torchvision at import time on machines without one; the stand-in must not make
    # transformers/diffusers believe a real torchvision exists afterwards.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(PACK_ROOT)!r})
        from comfyui_env import ensure_comfyui
        ensure_comfyui(cpu=True)
        import comfy.sd, comfy.model_base
        from diffusers import UNet2DConditionModel, DDIMScheduler
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_torchvision_stand_in_covers_what_newer_comfyui_imports(tmp_path):
    """Newer ComfyUI's comfy.model_base imports its detectors, which import torchvision.ops
    (comfy/ldm/sam3/detector.py: `from torchvision.ops import roi_align`; comfy/ldm/rt_detr/rtdetr_v4.py:
    `import torchvision`, then torchvision.ops at call time). A module with those import lines must
    load under the stand-in; calling what the stand-in lacks names the missing package."""
    (tmp_path / "newer_core_detector.py").write_text(textwrap.dedent("""
        import torchvision
        import torchvision.transforms as transforms
        from torchvision import transforms as T
        from torchvision.ops import roi_align
        from torchvision.transforms import functional as TF
        BICUBIC = transforms.InterpolationMode.BICUBIC  # attribute chains at module level
        def detect(boxes):
            return torchvision.ops.nms(boxes, boxes, 0.5)
    """))
    code = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(PACK_ROOT)!r}]
        import comfyui_env, torch
        assert importlib.util.find_spec("torchvision") is None, "this test needs a machine without torchvision"
        assert comfyui_env.install_torchvision_stand_in_if_missing()
        import newer_core_detector as d
        assert d.T is d.transforms and d.TF is sys.modules["torchvision.transforms.functional"]
        print(tuple(d.TF.resize(torch.ones(1, 3, 8, 8), 4).shape))
        for call in (lambda: d.roi_align(None, None, 7), lambda: d.detect(torch.zeros(2, 4))):
            try:
                call()
            except ModuleNotFoundError as e:
                print(e)
        comfyui_env.drop_torchvision_stand_in()
        print(importlib.util.find_spec("torchvision"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "(1, 3, 4, 4)"
    assert lines[1].startswith("torchvision.ops.roi_align needs torchvision, which is not installed")
    assert lines[2].startswith("torchvision.ops.nms needs torchvision, which is not installed")
    assert lines[3] == "None", "after the drop, probes see no torchvision again"
