"""Load a model, or only one pipeline stage of it, from a local safetensors checkpoint.

A stage is built on the meta device, pruned to the modules it owns, and then only the tensors
it owns are read from the safetensors files: no stage ever materialises the whole model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from distinfer.layout import StageLayout
from distinfer.models.families import Family, family_of
from distinfer.models.profiles import profile_for
from distinfer.quiet import quiet_transformers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):  # -> PreTrainedTokenizerBase
    """The model's tokenizer with left padding (for batched generation) and a pad token."""
    from transformers import AutoTokenizer

    quiet_transformers()
    profile = profile_for(model_dir)
    tok = AutoTokenizer.from_pretrained(
        model_dir, use_fast=profile.tokenizer_use_fast, trust_remote_code=trust_remote_code
    )
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_full_model(model_dir: Path, dtype: str, device: torch.device, trust_remote_code: bool = False) -> nn.Module:
    """The whole model with `transformers` (the single-device reference), safetensors only."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=DTYPES[dtype],
        attn_implementation="sdpa",
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device).eval()


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            files.update({name: path for name in f.keys()})
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    return files


def _source_name(name: str, family: Family, start: int, prefix: str, available: dict, tied: dict) -> str:
    """Checkpoint tensor name for a parameter of the pruned stage model (a fused experts tensor that the
    checkpoint keeps per expert: the name its parts share, `_fused_experts` reads them)."""
    pattern = rf"^{re.escape(family.layers)}\.(\d+)\."
    name = re.sub(pattern, lambda m: f"{family.layers}.{int(m.group(1)) + start}.", name)
    legacy = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")  # Mixtral's checkpoint names
    for candidate in (name, name.removeprefix(prefix + "."), tied.get(name, ""), legacy):
        if candidate in available:
            return candidate
    if name.endswith(FUSED_EXPERTS) and _expert_parts(name, 0)[0] in available:
        return name
    raise KeyError(f"tensor {name!r} not found in the checkpoint")


FUSED_EXPERTS = (".experts.gate_up_proj", ".experts.down_proj")  # transformers' 3-D expert weights


def _expert_parts(name: str, expert: int) -> list[str]:
    """The checkpoint tensors (Mixtral's per-expert w1, w3 / w2) that make expert `expert`'s slice of a fused
    experts tensor: gate_up_proj[e] = cat(w1, w3), down_proj[e] = w2."""
    base = name.rsplit(".experts.", 1)[0].replace(".mlp", ".block_sparse_moe") + f".experts.{expert}."
    return [base + "w1.weight", base + "w3.weight"] if name.endswith("gate_up_proj") else [base + "w2.weight"]


def _fused_experts(name: str, experts: int, available: dict, device: torch.device) -> torch.Tensor:
    parts = []
    for expert in range(experts):
        tensors = []
        for part in _expert_parts(name, expert):
            with safe_open(available[part], framework="pt", device=str(device)) as f:
                tensors.append(f.get_tensor(part))
        parts.append(torch.cat(tensors))
    return torch.stack(parts)


def load_stage_model(
    model_dir: Path,
    layout: StageLayout,
    dtype: str,
    device: torch.device,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Family]:
    """One pipeline stage: its decoder layers, plus the embedding (first) and norm + head (last)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[dtype], attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    family = family_of(model)
    family.keep_stage(model, layout.start, layout.stop, layout.is_first, layout.is_last)

    available = _checkpoint_files(model_dir)
    declared = getattr(model, "_tied_weights_keys", None)
    tied = dict(declared) if isinstance(declared, dict) and config.tie_word_embeddings else {}
    wanted = {name: _source_name(name, family, layout.start, model.base_model_prefix, available, tied)
              for name, _ in model.named_parameters(remove_duplicate=False)}
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    experts = int(getattr(config, "num_local_experts", 0) or 0)
    for name, source in wanted.items():
        if source not in available:  # a fused experts tensor from per-expert parts
            state[name] = _fused_experts(source, experts, available, device).to(DTYPES[dtype])
            continue
        by_file.setdefault(available[source], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in names:
                state[name] = f.get_tensor(wanted[name]).to(DTYPES[dtype])
    model.load_state_dict(state, strict=False, assign=True)
    for target, source in tied.items():  # keep tied weights one tensor where this stage owns both ends
        target_mod, source_mod = target.rpartition(".")[0], source.rpartition(".")[0]
        if _owns(model, target_mod) and _owns(model, source_mod):
            model.get_submodule(target_mod).weight = model.get_submodule(source_mod).weight
    family.rebuild_buffers(model, device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"stage left tensors unloaded: {leftover[:5]}")
    return model.eval(), family


def _owns(model: nn.Module, dotted: str) -> bool:
    try:
        return model.get_submodule(dotted) is not None
    except AttributeError:
        return False


def count_parameters(module: nn.Module) -> int:
    """Parameters of a module, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters())
