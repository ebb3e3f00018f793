"""Hyper-parameters from the front ends: `key=value` override text (the node), TOML files and flags
(the CLI), all checked against `TDFTConfig`'s fields and types and turned into one validated config
with `make_config(preset, **overrides)`.
"""
from __future__ import annotations

import json

from .config import TDFTConfig, field_types, make_config

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert(name: str, value, kind: type):
    """A value from text/TOML converted to the field's type; ValueError names the field."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
        text = str(value).strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return text
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a valid {kind.__name__}") from None


def check_overrides(values: dict) -> dict:
    """Typed copy of `values`; unknown names raise ValueError listing the known ones."""
    fields = field_types()
    out = {}
    for name, value in values.items():
        key = name.strip().replace("-", "_")
        if key not in fields:
            raise ValueError(f"unknown hyper-parameter {name!r}; known: {', '.join(sorted(fields))}")
        out[key] = None if value is None else convert(key, value, fields[key])
    return out


def parse_overrides(text: str) -> dict:
    """`key = value` lines (blank lines and `#` comments ignored) -> typed overrides."""
    values = {}
    for number, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise ValueError(f"overrides line {number}: {raw.strip()!r} is not `key = value`")
        key, value = (part.strip() for part in line.split("=", 1))
        if not key:
            raise ValueError(f"overrides line {number}: missing the name before '='")
        try:
            values.update(check_overrides({key: value}))
        except ValueError as e:
            raise ValueError(f"overrides line {number}: {e}") from None
    return values


def build_config(preset: str | None, overrides: dict) -> TDFTConfig:
    """Validated config from a preset and (already typed) overrides; ValueError says what is wrong
    (an unknown preset too: make_config checks it)."""
    return make_config(preset, **check_overrides(overrides))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def config_toml(options: dict, config: TDFTConfig) -> str:
    """A TOML file the CLI's --config reads back: `options` (model, data, output, ...) at the top, every
    hyper-parameter of `config` in a [hyperparameters] table."""
    lines = [f"{name} = {_toml_value(value)}" for name, value in options.items()]
    lines += ["", "[hyperparameters]"] + [f"{name} = {_toml_value(v)}" for name, v in config.to_dict().items()]
    return "\n".join(lines) + "\n"
