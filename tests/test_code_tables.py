"""Choices that exist as code tables are read from them: a new exporter is a new output_format of the
config, the CLI and the node's overrides with no other edit; the modes, adapters and the node's teacher
choices agree with the tables that implement them."""
from __future__ import annotations

import pytest

from comfy_selfnpo.training import cli, export
from comfy_selfnpo.training.config import choices_of, make_config
from comfy_selfnpo.training.settings import build_config, parse_overrides


def _cli_choices(flag: str) -> list:
    parser = cli.build_parser()
    return next(a for a in parser._actions if flag in a.option_strings).choices


def test_a_new_exporter_is_an_output_format_of_the_config_the_cli_and_the_node(monkeypatch):
    with pytest.raises(ValueError, match="output_format='npz' is not one of"):
        make_config(mode="lora", output_format="npz")
    monkeypatch.setitem(export.EXPORTERS, "npz", lambda trained, base_model: {})
    assert choices_of("output_format") == tuple(export.EXPORTERS)
    assert make_config(mode="lora", output_format="npz").output_format == "npz"
    assert "npz" in _cli_choices("--output-format")
    assert build_config("lora-12gb", parse_overrides("output_format = npz")).output_format == "npz"  # the node


@pytest.mark.parametrize("module, table, field, flag", [
    ("trained_kinds", "TRAINED_KINDS", "mode", "--mode"),
    ("adapter_kinds", "ADAPTERS", "adapter", "--adapter"),
])
def test_a_new_trained_kind_or_adapter_is_a_choice_of_the_config_the_cli_and_the_node(
        monkeypatch, module, table, field, flag):
    """The config and the CLI read the torch-free tables (trained_kinds.py, adapter_kinds.py) live: a
    new row is a new choice everywhere, with no other edit."""
    import importlib

    rows = getattr(importlib.import_module(f"comfy_selfnpo.training.{module}"), table)
    with pytest.raises(ValueError, match=f"{field}='dora' is not one of"):
        make_config(**{field: "dora"})
    monkeypatch.setitem(rows, "dora", rows[next(iter(rows))])
    assert choices_of(field) == tuple(rows) and "dora" in choices_of(field)
    assert make_config(**{field: "dora"}).__dict__[field] == "dora"
    assert "dora" in _cli_choices(flag)
    assert build_config("lora-12gb", parse_overrides(f"{field} = dora")).__dict__[field] == "dora"  # the node


def test_modes_adapters_and_teachers_are_the_tables_that_implement_them(comfy_registry):
    from comfy_selfnpo.nodes.train import TEACHER_CHOICES
    from comfy_selfnpo.training.adapters import ADAPTERS
    from comfy_selfnpo.training.trained import TRAINED

    # the config (torch-free: the CLI's parser reads it) names them; these tables hold them
    assert choices_of("mode") == tuple(TRAINED) and _cli_choices("--mode") == list(TRAINED)
    assert choices_of("adapter") == tuple(ADAPTERS) and _cli_choices("--adapter") == list(ADAPTERS)
    schema = comfy_registry.NODE_CLASS_MAPPINGS["SelfNPOTrainTDFT"].INPUT_TYPES()
    _kind, options = schema["optional" if "teacher" in schema.get("optional", {}) else "required"]["teacher"]
    assert list(options["options"]) == TEACHER_CHOICES == ["preset", *choices_of("teacher")]
    for teacher in choices_of("teacher"):
        assert make_config(teacher=teacher).teacher == teacher
