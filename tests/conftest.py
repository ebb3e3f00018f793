"""Test harness: boots the real ComfyUI (CPU mode) and hands out tiny, real ComfyUI models.

* ComfyUI is located by `comfyui_env.ensure_comfyui` (COMFYUI_PATH, enclosing ComfyUI, pinned cache)
  and put in CPU mode before `comfy.model_management` is imported.
* The pack is imported as `comfy_selfnpo` (installed with `pip install -e .`, or loaded straight
  from this checkout when it is not installed).
* ComfyUI's global state (loaded models, model folders, output folder, node registry, detection
  list, torch RNG) is restored after every test.
"""
from __future__ import annotations

import asyncio
import copy
import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parent.parent


def _import_pack():
    """Import this checkout as `comfy_selfnpo`, whether or not it was pip-installed."""
    spec = importlib.util.find_spec("comfy_selfnpo")
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == PACK_ROOT:
        import comfy_selfnpo

        return comfy_selfnpo
    spec = importlib.util.spec_from_file_location(
        "comfy_selfnpo", PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_selfnpo"] = module
    spec.loader.exec_module(module)
    return module


_import_pack()
from comfy_selfnpo.comfyui_env import ensure_comfyui  # noqa: E402

COMFYUI_ROOT = ensure_comfyui(cpu=True)

import torch  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.supported_models  # noqa: E402
import folder_paths  # noqa: E402

from comfy_selfnpo import tiny_models  # noqa: E402

logging.getLogger().setLevel(logging.WARNING)
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine extra threads make
# them many times slower (measured 6-40x under load): one thread unless OMP_NUM_THREADS asks for
# more. The tolerances of comparisons that differ only in reduction order are measured at 1, 2 and 4.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1").split(",")[0] or 1))


@pytest.fixture(autouse=True)
def comfy_global_state():
    """Snapshot ComfyUI's process-wide state and put it back after the test."""
    import nodes

    saved_folders = copy.deepcopy(folder_paths.folder_names_and_paths)
    saved_dirs = (folder_paths.get_output_directory(), folder_paths.get_temp_directory(),
                  folder_paths.get_input_directory())
    saved_models = list(comfy.supported_models.models)
    saved_nodes = dict(nodes.NODE_CLASS_MAPPINGS)
    saved_names = dict(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    saved_rng = torch.get_rng_state()
    try:
        yield
    finally:
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved_folders)
        folder_paths.filename_list_cache.clear()
        folder_paths.set_output_directory(saved_dirs[0])
        folder_paths.set_temp_directory(saved_dirs[1])
        folder_paths.set_input_directory(saved_dirs[2])
        comfy.supported_models.models[:] = saved_models
        nodes.NODE_CLASS_MAPPINGS.clear()
        nodes.NODE_CLASS_MAPPINGS.update(saved_nodes)
        nodes.NODE_DISPLAY_NAME_MAPPINGS.clear()
        nodes.NODE_DISPLAY_NAME_MAPPINGS.update(saved_names)
        torch.set_rng_state(saved_rng)


@pytest.fixture
def tiny():
    """The tiny-model builders, with the tiny configs registered for ComfyUI's file loaders."""
    tiny_models.register_tiny_model_configs()
    return tiny_models


@pytest.fixture(scope="session")
def comfy_registry():
    """ComfyUI's node registry with the core nodes, comfy_extras and this pack, loaded by ComfyUI's
    own custom-node loader exactly as the server does it. Returns the `nodes` module."""
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(PACK_ROOT))), "ComfyUI failed to import the pack"
    return nodes


@pytest.fixture
def comfy_dirs(tmp_path, tiny):
    """Temporary ComfyUI model/input/output folders. Returns a dict name -> Path."""
    dirs = {}
    for name in ("checkpoints", "loras", "diffusion_models", "text_encoders", "vae", "self_npo"):
        path = tmp_path / "models" / name
        path.mkdir(parents=True)
        folder_paths.folder_names_and_paths[name] = ([str(path)], set(folder_paths.supported_pt_extensions))
        dirs[name] = path
    for name, setter in (("output", folder_paths.set_output_directory),
                         ("input", folder_paths.set_input_directory),
                         ("temp", folder_paths.set_temp_directory)):
        path = tmp_path / name
        path.mkdir()
        setter(str(path))
        dirs[name] = path
    folder_paths.filename_list_cache.clear()
    return dirs
