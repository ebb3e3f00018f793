"""The `self_npo` models folder: where trained Self-NPO weights are saved and the loader looks.

Registered with ComfyUI's `folder_paths` when the pack loads (and by the headless trainer), so a
file the training node writes is listed by the loader right away. Users can add more locations
under the `self_npo` key of `extra_model_paths.yaml`, as for any ComfyUI model folder: ComfyUI reads
that file before it loads custom nodes, so registration adds `models/self_npo` to what the file
declared (as the default, first in the list: new weights are written there) instead of replacing it.
"""
from __future__ import annotations

import inspect
import os

SELF_NPO_FOLDER = "self_npo"


def register_self_npo_folder() -> None:
    """Make `self_npo` a model folder with `models/self_npo` first. Idempotent: a folder that already
    has its model extensions was set up (by an earlier call, or a harness choosing its own folders)
    and is left as it is; one without any was declared only by extra_model_paths.yaml, which
    ComfyUI reads before it loads custom nodes: the default is added in front of those entries."""
    import folder_paths

    registered = folder_paths.folder_names_and_paths.get(SELF_NPO_FOLDER)
    if registered is not None and registered[1]:
        return
    default = os.path.join(folder_paths.models_dir, SELF_NPO_FOLDER)
    if "is_default" in inspect.signature(folder_paths.add_model_folder_path).parameters:
        folder_paths.add_model_folder_path(SELF_NPO_FOLDER, default, is_default=True)
    else:  # cores older than is_default append: put the default first by hand
        folder_paths.add_model_folder_path(SELF_NPO_FOLDER, default)
        paths = folder_paths.folder_names_and_paths[SELF_NPO_FOLDER][0]
        paths.insert(0, paths.pop(paths.index(default)))
    paths = folder_paths.folder_names_and_paths[SELF_NPO_FOLDER][0]
    folder_paths.folder_names_and_paths[SELF_NPO_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


def self_npo_output_dir() -> str:
    """The first `self_npo` folder, created if needed: where new weights are written."""
    import folder_paths

    register_self_npo_folder()
    path = folder_paths.get_folder_paths(SELF_NPO_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path
