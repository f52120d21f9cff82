"""Model profiles: per-model loading quirks, and facts read from config.json without torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distinfer.models.tiny import TINY_MODELS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ModelProfile:
    """How to load one model family's checkpoint correctly."""

    name: str
    tokenizer_use_fast: bool = True
    note: str = ""


# OpenLLaMA's fast tokenizer gives wrong token ids (transformers issues 24233 and 25069).
PROFILES = (
    ModelProfile("open_llama", tokenizer_use_fast=False, note="fast tokenizer gives wrong ids; use the slow one"),
)
DEFAULT_PROFILE = ModelProfile("default")


def profile_for(model_dir: str | Path) -> ModelProfile:
    """The profile whose name appears in the model folder name or its config's _name_or_path."""
    names = [str(model_dir).lower()]
    config = Path(model_dir) / "config.json"
    if config.is_file():
        names.append(str(json.loads(config.read_text()).get("_name_or_path", "")).lower())
    for profile in PROFILES:
        if any(profile.name in name.replace("-", "_") for name in names):
            return profile
    return DEFAULT_PROFILE


def read_model_config(model_dir: Path) -> dict:
    """config.json of a model folder, with clear errors for what is missing."""
    if not model_dir.is_dir():
        raise ValueError(f"model folder not found: {model_dir}")
    config = model_dir / "config.json"
    if not config.is_file():
        raise ValueError(f"{model_dir} has no config.json (expected a Hugging Face model folder)")
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{model_dir} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)})")
    if not list(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir} has no *.safetensors weights (pickled weights are not loaded)")
    return data


def model_layer_count(model: str | Path) -> int:
    """Number of decoder layers of a built-in model name or a model folder."""
    if isinstance(model, str) and model in TINY_MODELS:
        return int(TINY_MODELS[model].config["num_hidden_layers"])
    return config_layer_count(read_model_config(Path(model)), f"{model}/config.json")


def read_json_file(config_file: Path) -> dict:
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    return data


def max_positions(config: dict) -> int | None:
    """The longest sequence (prompt + generated tokens) the model's position embeddings allow, if stated."""
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def config_layer_count(data: dict, where: str) -> int:
    """Number of decoder layers a config names; `where` names the config in the error."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in data:
            return int(data[key])
    raise ValueError(f"{where} names no layer count (num_hidden_layers or n_layer)")
