"""Find a ComfyUI source tree and make `comfy.*` importable outside the ComfyUI server.

Inside a running ComfyUI (the pack sits in `ComfyUI/custom_nodes/`) nothing here is needed:
`comfy` is already importable. The headless trainer and the test suite call
`ensure_comfyui()` first. Search order, as documented in the README:

1. `COMFYUI_PATH` (environment variable);
2. the ComfyUI root that contains this pack when it sits in `ComfyUI/custom_nodes/`;
3. the cache `${XDG_CACHE_HOME:-~/.cache}/comfy-selfnpo/ComfyUI-8ad38d20`, filled by
   `scripts/setup_comfyui.sh` with the pinned upstream commit.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

PINNED_COMMIT = "8ad38d2073b019a204f730182dcf5456fb260858"
PACK_ROOT = Path(__file__).resolve().parent

log = logging.getLogger("comfy_selfnpo")


class ComfyUINotFound(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comfy-selfnpo" / f"ComfyUI-{PINNED_COMMIT[:8]}"


def _is_comfyui_root(path: Path) -> bool:
    return (path / "comfy" / "samplers.py").is_file() and (path / "nodes.py").is_file()


def candidate_roots() -> list[tuple[str, Path]]:
    """Every place we look, in order, with the reason we look there."""
    out = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        out.append(("COMFYUI_PATH", Path(env).expanduser().resolve()))
    if PACK_ROOT.parent.name == "custom_nodes":
        out.append(("the ComfyUI that contains this pack", PACK_ROOT.parent.parent))
    out.append(("the pinned cache", cache_dir()))
    return out


def find_comfyui() -> Path:
    tried = []
    for why, root in candidate_roots():
        if _is_comfyui_root(root):
            return root
        tried.append(f"  - {why}: {root} (no ComfyUI source tree there)")
    raise ComfyUINotFound(
        "ComfyUI was not found. Looked in:\n" + "\n".join(tried) + "\n"
        "Do one of:\n"
        "  * install this pack into ComfyUI/custom_nodes/ (it then uses that ComfyUI), or\n"
        "  * export COMFYUI_PATH=/path/to/ComfyUI, or\n"
        f"  * run `bash scripts/setup_comfyui.sh` (clones ComfyUI {PINNED_COMMIT[:8]} into {cache_dir()};\n"
        "    set COMFYUI_GIT to a local clone or mirror when offline)."
    )


def _cuda_or_other_accelerator_available() -> bool:
    import torch

    if torch.cuda.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


class _MissingTorchvisionName:
    """A torchvision name the stand-in does not provide: attribute chains resolve (module-level code
    such as `transforms.InterpolationMode.BICUBIC` imports fine), calling it says what is missing."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _MissingTorchvisionName(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise ModuleNotFoundError(
            f"{self._name} needs torchvision, which is not installed (this ComfyUI runs with comfy-selfnpo's "
            "stand-in, enough for SD1.5/SDXL). Install a torchvision that matches your torch to use this model.")

    def __repr__(self) -> str:
        return f"<missing {self._name}>"


class _StandInModule(types.ModuleType):
    __comfy_selfnpo_stand_in__ = True

    def __getattr__(self, attr: str):  # PEP 562: `from torchvision.ops import roi_align`
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _MissingTorchvisionName(f"{self.__name__}.{attr}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves every `torchvision.<sub>` import (ops, models, io, ...) with a stand-in module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_torchvision_stand_in_if_missing() -> bool:
    """`comfy.model_base` imports torchvision at load time: v0.14 for Cosmos/Cascade
    (`torchvision.transforms`), newer cores also for their detectors (`from torchvision.ops import
    roi_align` in comfy/ldm/sam3/detector.py, `import torchvision` in comfy/ldm/rt_detr/rtdetr_v4.py).
    When no real torchvision is importable (CPU-only machines have no usable wheel), register a
    stand-in so that SD1.5/SDXL models, which never touch it, load: every `torchvision.*` module and
    name imports, `transforms.functional.resize` works, anything else raises a clear error when
    called. A real torchvision always wins. Returns whether the stand-in was installed."""
    if "torchvision" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision  # noqa: F401  real one works: use it

            return False
    except Exception:  # a broken CUDA-only wheel raises at import
        pass
    import torch.nn.functional as F

    def resize(img, size, interpolation=None, antialias=True):
        if isinstance(size, int):
            size = [size, size]
        return F.interpolate(img, size=list(size), mode="bilinear", align_corners=False, antialias=antialias)

    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    tv = finder.create_module(importlib.machinery.ModuleSpec("torchvision", finder, is_package=True))
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", finder, is_package=True)
    sys.modules["torchvision"] = tv
    importlib.import_module("torchvision.transforms.functional").resize = resize  # served by the finder
    log.warning("torchvision is not importable; using a minimal stand-in (SD1.5/SDXL do not need it).")
    return True


def drop_torchvision_stand_in() -> None:
    """Take the stand-in out of `sys.modules` and the import system (modules that imported it keep
    their reference)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _StandInFinder)]
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _import_comfy_then_drop_stand_in() -> None:
    """Import the ComfyUI modules that `import torchvision` at load time (they keep their reference to
    the stand-in), then take the stand-in out of `sys.modules`: transformers and diffusers probe
    for torchvision with `find_spec` and would otherwise try to use the stand-in as the real thing."""
    import comfy.controlnet  # noqa: F401  (cascade's controlnet)
    import comfy.model_base  # noqa: F401  (cosmos, cascade)
    import comfy.sd  # noqa: F401  (ace, stage_c_coder)

    drop_torchvision_stand_in()
    # transformers (imported by ComfyUI's text encoders) memoises its torchvision probe: re-probe.
    import_utils = sys.modules.get("transformers.utils.import_utils")
    for probe in ("is_torchvision_available", "is_torchvision_v2_available"):
        cache_clear = getattr(getattr(import_utils, probe, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def ensure_comfyui(cpu: bool | None = None) -> Path:
    """Make `comfy`, `nodes`, `folder_paths`, ... importable and return the ComfyUI root.

    `cpu=None` picks CPU mode only when torch sees no accelerator. CPU mode must be decided
    before `comfy.model_management` is imported, so call this before importing any `comfy.*`.
    """
    if "comfy.model_management" in sys.modules:  # already running inside ComfyUI
        import comfy  # a namespace package: no __file__, one __path__ entry

        return Path(list(comfy.__path__)[0]).resolve().parent
    root = find_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    stand_in = install_torchvision_stand_in_if_missing()
    from comfy.cli_args import args  # importing cli_args does not parse the command line

    if cpu is None:
        cpu = not _cuda_or_other_accelerator_available()
    if cpu:
        args.cpu = True
    if stand_in:
        _import_comfy_then_drop_stand_in()
    return root
