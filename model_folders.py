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


def list_model_files(folder: str) -> list[str]:
    """The files of a ComfyUI model folder (names relative to each of its locations, with the
    folder's extensions), like `folder_paths.get_filename_list` but safe on symlink loops: core's
    listing follows links without remembering where it has been, so a link back up the tree lists
    every file dozens of times and two such links keep it walking for minutes. Each directory is
    entered once (by its real path), each file listed once (its first name)."""
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths[folder]
    seen_dirs, seen_files, names = set(), set(), []
    for root in paths:
        for dirpath, subdirs, files in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen_dirs:
                subdirs[:] = []
                continue
            seen_dirs.add(real)
            subdirs[:] = sorted(d for d in subdirs if d != ".git" and os.path.realpath(os.path.join(dirpath, d))
                                not in seen_dirs)
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if extensions and os.path.splitext(name)[1].lower() not in extensions:
                    continue
                real_file = os.path.realpath(path)
                if real_file in seen_files:
                    continue
                seen_files.add(real_file)
                names.append(os.path.relpath(path, root))
    return sorted(set(names))
