"""The `self_npo` models folder: where trained Self-NPO weights are saved and the loader looks.

Registered with ComfyUI's `folder_paths` when the pack loads (and by the headless trainer), so a
file the training node writes is listed by the loader right away. Users can add more locations
under the `self_npo` key of `extra_model_paths.yaml`, as for any ComfyUI model folder.
"""
from __future__ import annotations

import os

SELF_NPO_FOLDER = "self_npo"


def register_self_npo_folder() -> None:
    import folder_paths

    if SELF_NPO_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, SELF_NPO_FOLDER)
        folder_paths.folder_names_and_paths[SELF_NPO_FOLDER] = ([path], set(folder_paths.supported_pt_extensions))


def self_npo_output_dir() -> str:
    """The first `self_npo` folder, created if needed: where new weights are written."""
    import folder_paths

    register_self_npo_folder()
    path = folder_paths.get_folder_paths(SELF_NPO_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path
