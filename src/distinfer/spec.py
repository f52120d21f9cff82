"""Experiment file: YAML validated into typed models, with messages that name file and field.

`load_experiment` reads the file (spec_yaml.py), validates it against the schema (spec_schema.py), formats the
first error (spec_errors.py) and checks across fields and against the model and prompts on disk
(spec_checks.py). Nothing here imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from distinfer.models.profiles import config_layer_count, read_json_file, read_model_config
from distinfer.models.tiny import TINY_MODELS
from distinfer.spec_checks import (
    check_cluster,
    check_context,
    check_experts,
    check_layout,
    check_prompts,
    check_serving,
    check_study,
    check_tensor_parallel,
    check_workload,
)
from distinfer.spec_errors import format_error
from distinfer.spec_schema import Experiment, SpecError, resolve_path
from distinfer.spec_yaml import read_yaml

__all__ = ["Experiment", "SpecError", "load_experiment", "resolve_path"]


def load_experiment(path: str | Path, require_model: bool = True) -> Experiment:
    """Read and validate an experiment file, including checks against the model and prompts on disk.

    With require_model=False (planning for a cluster) a model folder that is not reachable from here
    is accepted: its facts come from `model.config` if given, and the job on the cluster will say.
    """
    path = Path(path)
    data = read_yaml(path)
    try:
        exp = Experiment.model_validate(data)
    except ValidationError as exc:
        # In a union (value or list of values) the deepest error is the specific one, e.g. batch_size[1].
        deepest = max(exc.errors(), key=lambda e: len(e["loc"]))
        raise SpecError(format_error(path, deepest)) from None
    check_prompts(path, exp)
    num_layers: int | None = None
    config: dict | None = None  # the model's config.json, read once for the layer count and the positions
    if exp.model.builtin is not None:
        config = TINY_MODELS[exp.model.builtin].config
        num_layers = config_layer_count(config, exp.model.builtin)
    elif exp.model.config is not None:
        config_file = resolve_path(exp.model.config, path)
        try:
            config = read_json_file(config_file)
            num_layers = config_layer_count(config, str(config_file))
        except ValueError as exc:
            raise SpecError(f"{path}: field 'model.config': {exc}") from None
    else:
        model_dir = resolve_path(str(exp.model.path), path)
        try:
            found = read_model_config(model_dir)
            num_layers = config_layer_count(found, f"{model_dir}/config.json")
            config = found
        except ValueError as exc:
            if require_model or model_dir.exists():
                raise SpecError(f"{path}: field 'model.path': {exc}") from None
    if config is not None:
        check_context(path, exp, config)
        check_tensor_parallel(path, exp, config)
        check_experts(path, exp, config)
    if num_layers is not None:
        check_layout(path, exp, num_layers)
    check_study(path, exp)
    check_serving(path, exp)
    check_workload(path, exp, config)
    if "cluster" in exp.model_fields_set:
        check_cluster(path, exp)
    return exp


