"""The nodes explain themselves: every input and output has a tooltip, expert inputs sit behind
ComfyUI's "advanced" toggle, search finds the nodes under the names users type, and the training
node carries each preset's values for the frontend to show."""
from __future__ import annotations

from pathlib import Path

import pytest

from comfy_selfnpo.nodes import load_node_classes

EXPERT = {
    "SelfNPOTrainTDFT": {"learning_rate", "lora_rank", "teacher", "save_every", "preview_every", "overrides"},
    "SelfNPOCFGGuider": {"residency", "rank"},
    "SelfNPOApply": {"residency", "rank"},
}
ALIASES = {"SelfNPOTrainTDFT": {"NPO", "Diffusion-NPO", "negative LoRA", "autoguidance"},
           "SelfNPOCFGGuider": {"NPO", "Diffusion-NPO", "negative LoRA", "autoguidance"},
           "SelfNPOApply": {"NPO", "Diffusion-NPO", "negative LoRA", "autoguidance"}}


def schemas() -> dict:
    return {cls.define_schema().node_id: cls.define_schema() for cls in load_node_classes()}


def test_every_input_and_output_of_every_node_has_a_tooltip(comfy_registry):
    found = schemas()
    assert set(EXPERT) <= set(found) and "SelfNPONegativeModelLoader" in found
    for node_id, schema in found.items():
        for item in list(schema.inputs) + list(schema.outputs):
            name = getattr(item, "id", None) or getattr(item, "display_name", None)
            assert (item.tooltip or "").strip(), f"{node_id}: {name} has no tooltip"


def test_expert_inputs_are_marked_advanced_and_the_rest_are_not(comfy_registry):
    for node_id, expert in EXPERT.items():
        advanced = {i.id for i in schemas()[node_id].inputs if i.advanced}
        assert advanced == expert, node_id


def test_search_finds_the_nodes_under_the_names_users_type(comfy_registry):
    for node_id, aliases in ALIASES.items():
        assert aliases <= set(schemas()[node_id].search_aliases), node_id


def test_the_training_preset_combo_carries_each_presets_values_for_the_frontend(comfy_registry):
    from comfy_selfnpo.training.config import DEFAULT_PRESET, PRESETS, TDFTConfig

    definition = comfy_registry.NODE_CLASS_MAPPINGS["SelfNPOTrainTDFT"].INPUT_TYPES()
    preset_type, options = definition["required"]["preset"]
    assert options["default"] == DEFAULT_PRESET
    shown = options["selfnpo_presets"]
    assert set(shown) == set(PRESETS)
    defaults = TDFTConfig()
    for name, values in PRESETS.items():
        for widget in ("steps", "lora_rank", "teacher"):
            assert shown[name][widget] == values.get(widget, getattr(defaults, widget)), (name, widget)
    # full presets: 0 = the model family's recipe (1e-6 SD1.5, 1e-7 SDXL); LoRA: the same for every family
    assert shown["sd15"]["learning_rate"] == 0 and shown["lora-12gb"]["learning_rate"] == 1e-4
    js = Path(__file__).resolve().parent.parent / "web" / "selfnpo_train_presets.js"
    assert "selfnpo_presets" in js.read_text() and "SelfNPOTrainTDFT" in js.read_text()


def test_the_shipped_templates_show_the_preset_values_on_the_training_node(comfy_registry):
    from test_workflows import build

    from comfy_selfnpo.nodes.train import preset_widget_values

    assert build.LORA_12GB == preset_widget_values()["lora-12gb"]


@pytest.mark.parametrize("name", ["mydata", "clips/set1"])
def test_the_data_folder_can_be_picked_from_comfyuis_input_folder(comfy_registry, comfy_dirs, name):
    from comfy_selfnpo.nodes.train import input_subfolders

    (comfy_dirs["input"] / name).mkdir(parents=True)
    (comfy_dirs["input"] / "a_file.png").write_bytes(b"")
    options = input_subfolders()
    assert options[0] == "" and name in options and "a_file.png" not in options
