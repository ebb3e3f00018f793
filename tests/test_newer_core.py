"""What the newest ComfyUI (v0.38) does differently, met on the pinned core: a dynamic MODEL that cannot
be cloned non-dynamically, and a template route that serves only workflow .json files."""
from __future__ import annotations

import urllib.error
import urllib.parse
from pathlib import Path

import pytest
import torch

from conftest import COMFYUI_ROOT, PACK_ROOT
from server_harness import ComfyServer
from test_tdft_trainer import _CastTimePatcher
from test_train_node import run_dir, train_inputs


def test_train_node_trains_a_dynamic_model_whose_loader_registered_no_reload(comfy_registry, comfy_dirs, tiny):
    """v0.38: clone(disable_dynamic=True) of a dynamic MODEL from a custom loader raises RuntimeError
    ("Cannot create non-dynamic delegate: cached_patcher_init is not initialized."); the node trains
    the dynamic model itself, as on a core without the option."""
    from comfy_selfnpo.nodes.train import SelfNPOTrainTDFT

    ckpt = tiny.build_checkpoint("sd15", seed=0)
    user = _CastTimePatcher(ckpt.model.model, ckpt.model.load_device, ckpt.model.offload_device)
    user.rebuild = "no loader init"
    with pytest.raises(RuntimeError, match="cached_patcher_init is not initialized"):
        user.clone(disable_dynamic=True)  # the stand-in does what v0.38 does
    with torch.inference_mode():  # as ComfyUI's executor runs a node
        out = SelfNPOTrainTDFT.execute(user, ckpt.clip, **train_inputs(steps=2, save_every=0))
    assert Path(out.args[1]).parent == comfy_dirs["self_npo"] and Path(out.args[1]).is_file()
    assert (run_dir(comfy_dirs) / "summary.json").is_file()
    losses = out.args[4]["loss"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def _status(server, path: str) -> int:
    try:
        server.get_bytes(path)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


def test_template_thumbnails_are_served_where_newer_frontends_and_cores_look(tmp_path):
    """The newer frontend shows a pack template with `/api/workflow_templates/<pack>/<name>.jpg`; newer
    cores answer only .json there, so the pack serves its pictures itself (both with and without /api,
    as core registers every route) and leaves .json files to core."""
    server = ComfyServer(COMFYUI_ROOT, PACK_ROOT, tmp_path / "comfy")
    server.prepare()
    try:
        server.start()
        pictures = sorted((PACK_ROOT / "example_workflows").glob("*.jpg"))
        assert len(pictures) >= 6
        for picture in pictures:
            name = urllib.parse.quote(picture.name)
            for prefix in ("/api/workflow_templates/comfy-selfnpo/", "/workflow_templates/comfy-selfnpo/"):
                assert server.get_bytes(prefix + name) == picture.read_bytes(), prefix + name
        # at the pin, only core's /api mount serves .json: the pack's route does not claim it
        assert _status(server, "/workflow_templates/comfy-selfnpo/" + urllib.parse.quote(pictures[0].stem) + ".json") == 404
        assert _status(server, "/workflow_templates/comfy-selfnpo/missing.jpg") == 404
        assert _status(server, "/workflow_templates/comfy-selfnpo/..%2Fdocs%2Fimages%2Ficon.png") == 404
    finally:
        server.stop()
