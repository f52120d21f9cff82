"""Checks across fields of an experiment, and against its model and prompts: layouts against the model's layers
and the cluster, what each engine takes (engines.py), serving against offline fields, named studies."""

from __future__ import annotations

import itertools
from pathlib import Path

from distinfer.engines import SELECTABLE, capabilities, named, taking
from distinfer.layout import Layout, LayoutError, place_engine, tensor_split_problem, world_size
from distinfer.models.profiles import max_positions
from distinfer.profiles import HARDWARE
from distinfer.prompts import PromptFileError, load_prompts, read_paragraphs
from distinfer.spec_schema import Experiment, SpecError, as_list, layer_lists, resolve_path


def check_layout(path: Path, exp: Experiment, num_layers: int) -> None:
    layers = exp.parallel.layers
    if layers != "auto":
        lists = layer_lists(exp.parallel)
        for stages in lists:
            if sum(stages) != num_layers:
                raise SpecError(
                    f"{path}: field 'parallel.layers': {stages} sums to {sum(stages)}, but the model has "
                    f"{num_layers} decoder layers; the per-stage counts must add up to {num_layers}"
                )
        pp_values = as_list(exp.parallel.pp)
        if "pp" in exp.parallel.model_fields_set and any(len(s) not in pp_values for s in lists):
            raise SpecError(
                f"{path}: field 'parallel.layers': each layer list needs one entry per stage; "
                f"pp is {pp_values} but the lists have {sorted({len(s) for s in lists})} entries"
            )
    for pp in as_list(exp.parallel.pp):
        if pp > num_layers:
            raise SpecError(
                f"{path}: field 'parallel.pp': {pp} stages for a model with {num_layers} decoder layers; "
                f"allowed: 1..{num_layers}"
            )
    engines = as_list(exp.parallel.engine)
    if not taking(engines, "pp") and (as_list(exp.parallel.pp) != [1] or layers != "auto"):
        raise SpecError(f"{path}: field 'parallel.pp': pipeline stages need engine {named(taking(SELECTABLE, 'pp'))}; "
                        f"engines here: {', '.join(engines)}")
    if not taking(engines, "tp") and as_list(exp.parallel.tp) != [1]:
        raise SpecError(f"{path}: field 'parallel.tp': tensor parallelism needs engine "
                        f"{named(taking(SELECTABLE, 'tp'))}; engines here: {', '.join(engines)}")
    for engine in engines:
        least = capabilities(engine).min_tp
        if max(as_list(exp.parallel.tp)) < least:
            raise SpecError(f"{path}: field 'parallel.tp': engine {engine} splits the model over tp >= {least} ranks "
                            f"(with tp 1 it is the reference); set parallel.tp, e.g. {least}")
    if as_list(exp.parallel.ep) != [1]:
        if not taking(engines, "ep"):
            raise SpecError(f"{path}: field 'parallel.ep': expert parallelism needs engine "
                            f"{named(taking(SELECTABLE, 'ep'))}; engines here: {', '.join(engines)}")
        if as_list(exp.parallel.tp) != [1]:
            raise SpecError(f"{path}: field 'parallel.ep': expert parallel stages run with tp 1; got tp "
                            f"{as_list(exp.parallel.tp)}")
    serving = exp.scenario.kind == "serving"  # a server's groups of requests share scenario.max_batch
    limits = [exp.scenario.max_batch] if serving else as_list(exp.batch_size)
    for mb in as_list(exp.parallel.microbatches):
        for bs in limits:
            if mb > bs and serving:
                raise SpecError(f"{path}: field 'parallel.microbatches': {mb} groups of requests cannot share "
                                f"scenario.max_batch {bs}; allowed: 1..{bs}")
            if mb > bs:
                raise SpecError(
                    f"{path}: field 'parallel.microbatches': {mb} micro-batches cannot split batch_size {bs}; "
                    f"allowed: 1..{bs}"
                )


def run_layouts(exp: Experiment) -> list[tuple[str, Layout]]:
    """Every (engine, layout) the matrix runs, once each, placed on the experiment's cluster; LayoutError for
    the first that cannot be placed. Single-device reference runs take one node whatever `cluster.nodes` says."""
    profile = HARDWARE[exp.cluster.profile]
    return [(engine, place_engine(engine, pp, tp, ep, gpu=profile.gpu, gpus_per_node=exp.cluster.gpus_per_node,
                                  nodes=exp.cluster.nodes))
            for engine, pp, tp, ep in _shapes(exp)]


def _shapes(exp: Experiment) -> list[tuple[str, int, int, int]]:
    """Every (engine, pp, tp, ep) of the matrix once, each engine's axes as engines.py says."""
    explicit = layer_lists(exp.parallel)
    stage_counts = sorted({len(s) for s in explicit} if explicit else set(as_list(exp.parallel.pp)))
    shapes: dict[tuple[str, int, int, int], None] = {}
    for engine, pp, tp, ep in itertools.product(as_list(exp.parallel.engine), stage_counts, as_list(exp.parallel.tp),
                                                as_list(exp.parallel.ep)):
        axes = capabilities(engine).axes(pp, None, 1, tp, ep)  # the axes the engine does not take are 1
        if axes is not None:
            shapes[(engine, axes[0], axes[3], axes[4])] = None
    return list(shapes)


def check_cluster(path: Path, exp: Experiment) -> None:
    profile = HARDWARE[exp.cluster.profile]
    for dtype in as_list(exp.model.dtype):
        if dtype != "int8" and dtype not in profile.dtypes:
            raise SpecError(
                f"{path}: field 'model.dtype': {dtype} is not supported on {profile.name} "
                f"({profile.note or 'see the profile'}); allowed: {', '.join(profile.dtypes)}, int8"
            )
    if profile.gpu and exp.cluster.gpus_per_node == 0:
        raise SpecError(f"{path}: field 'cluster.gpus_per_node': the {profile.name} profile needs at least 1")
    try:
        run_layouts(exp)
    except LayoutError as exc:
        raise SpecError(f"{path}: field '{exc.field}': {exc}") from None


def check_serving(path: Path, exp: Experiment) -> None:
    """A serving scenario measures a server: the offline-only fields and sweeps make no sense with it."""
    serving = exp.scenario.kind == "serving"
    if exp.endpoint is not None and not serving:
        raise SpecError(f"{path}: field 'endpoint': an endpoint is measured by a serving scenario; "
                        "set scenario.kind: serving (with a rate or a concurrency)")
    if not serving:
        return
    against = "an endpoint" if exp.endpoint is not None else "distinfer's server"
    offline_only = [name for name, wanted in (
        ("prompts_per_rank", exp.prompts_per_rank is not None),
        ("batch_size", "batch_size" in exp.model_fields_set),
        ("parallel", exp.endpoint is not None and "parallel" in exp.model_fields_set),
        ("benchmark.repeats", exp.benchmark.repeats != 1),
        ("benchmark.warmup", "warmup" in exp.benchmark.model_fields_set),
        ("accuracy", "accuracy" in exp.model_fields_set),
        ("study", exp.study not in ("matrix",)),
        ("model.dtype", exp.endpoint is not None and isinstance(exp.model.dtype, list)),
    ) if wanted]
    if offline_only:
        raise SpecError(f"{path}: field '{offline_only[0]}': not used by a serving scenario against {against} "
                        "(the server batches requests itself, up to scenario.max_batch; warm-up is "
                        "scenario.warmup_requests); remove it")
    if exp.endpoint is not None and exp.scenario.client.nodes > 1:
        raise SpecError(f"{path}: field 'scenario.client.nodes': client nodes are nodes of the run's own Slurm job; "
                        "a load to an endpoint is sent from the machine that runs it (client.nodes: 1)")
    if exp.endpoint is None:  # every engine serves (vllm through `vllm serve`)
        if as_list(exp.parallel.ep) != [1]:
            raise SpecError(f"{path}: field 'parallel.ep': distinfer's server runs pipeline stages of one rank "
                            "(ep 1)")
        unsplit = [e for e in taking(as_list(exp.parallel.engine), "tp") if not capabilities(e).serves_tp]
        if unsplit and as_list(exp.parallel.tp) != [1]:
            raise SpecError(f"{path}: field 'parallel.tp': distinfer's server runs {unsplit[0]} stages of one rank "
                            f"(tp 1); serve tensor parallel with engine {named(taking(SELECTABLE, 'serves_tp'))}")


def check_tensor_parallel(path: Path, exp: Experiment, config: dict) -> None:
    """Every tp of the sweep splits the model's heads, its key/value heads and its MLP."""
    if not taking(as_list(exp.parallel.engine), "tp"):
        return
    for tp in as_list(exp.parallel.tp):
        if tp > 1:
            problem = tensor_split_problem(config, tp)
            if problem:
                raise SpecError(f"{path}: field 'parallel.tp': {problem}")


def check_experts(path: Path, exp: Experiment, config: dict) -> None:
    """ep > 1 needs a mixture-of-experts model whose experts it divides."""
    eps = [ep for ep in as_list(exp.parallel.ep) if ep > 1]
    if not eps:
        return
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        raise SpecError(f"{path}: field 'parallel.ep': expert parallelism needs a mixture-of-experts model; this "
                        "one is dense (its config has no num_local_experts)")
    for ep in eps:
        if int(experts) % ep:
            raise SpecError(f"{path}: field 'parallel.ep': ep {ep} does not divide the model's {experts} experts")


def check_context(path: Path, exp: Experiment, config: dict) -> None:
    """Prompt + new tokens must fit the model's positions (OpenLLaMA-3B v2: 2048)."""
    limit = max_positions(config)
    if limit is None:
        return
    new = exp.generation.max_new_tokens
    if isinstance(exp.prompts, str):
        prompt, field = exp.generation.max_prompt_tokens, "generation.max_prompt_tokens"
    else:
        prompt, field = max(as_list(exp.prompts.context_tokens)), "prompts.context_tokens"
    if prompt is None and new >= limit:  # a prompt has at least one token
        raise SpecError(f"{path}: field 'generation.max_new_tokens': {new} new tokens leave no room for a prompt in "
                        f"the model's {limit} positions; allowed: 1..{limit - 1} (minus the prompt's tokens)")
    if prompt is not None and prompt + new > limit:
        raise SpecError(f"{path}: field '{field}': {prompt} prompt tokens + {new} new tokens exceed the model's "
                        f"{limit} positions; allowed: prompt + max_new_tokens <= {limit}")


def check_prompts(path: Path, exp: Experiment) -> None:
    field = "prompts" if isinstance(exp.prompts, str) else "prompts.texts"
    source = exp.prompts if isinstance(exp.prompts, str) else exp.prompts.texts
    file = resolve_path(source, path)
    if not file.is_file():
        raise SpecError(f"{path}: field '{field}': file not found: {source}")
    try:
        if isinstance(exp.prompts, str):
            load_prompts(file)
        else:
            read_paragraphs(file)
    except PromptFileError as exc:
        raise SpecError(f"{path}: field '{field}': {exc}") from None
    if exp.accuracy.perplexity_text is not None and not resolve_path(exp.accuracy.perplexity_text, path).is_file():
        raise SpecError(f"{path}: field 'accuracy.perplexity_text': file not found: {exp.accuracy.perplexity_text}")


def world_sizes(exp: Experiment) -> set[int]:
    """The rank counts the matrix covers (each engine's layouts: its axes as engines.py says)."""
    return {world_size(pp, tp, ep) for _, pp, tp, ep in _shapes(exp)}


def swept_axes(exp: Experiment) -> list[str]:
    """The sweep fields that hold more than one value."""
    par = exp.parallel
    layouts = layer_lists(par)
    axes = {"parallel.engine": par.engine, "parallel.pp": par.pp, "parallel.tp": par.tp, "parallel.ep": par.ep,
            "parallel.microbatches": par.microbatches, "batch_size": exp.batch_size, "model.dtype": exp.model.dtype,
            "parallel.layers": layouts if len(layouts) > 1 else None}
    if not isinstance(exp.prompts, str):
        axes["prompts.context_tokens"] = exp.prompts.context_tokens
    return [name for name, value in axes.items() if isinstance(value, list) and len(value) > 1]


def check_study(path: Path, exp: Experiment) -> None:
    """A named study must sweep what it is about; int8 and prompts_per_rank only where they work."""
    need = {
        "strong-scaling": (len(world_sizes(exp)) >= 2, "parallel.pp", "at least two rank counts, e.g. pp: [1, 2, 3]"),
        "weak-scaling": (len(world_sizes(exp)) >= 2, "parallel.pp", "at least two rank counts, e.g. pp: [1, 2, 3]"),
        "batch-sweep": (len(as_list(exp.batch_size)) >= 2, "batch_size", "at least two batch sizes"),
        "precision-sweep": (len(as_list(exp.model.dtype)) >= 2, "model.dtype",
                            "at least two precisions, e.g. [float32, float16, int8]"),
        "optimization": (len(swept_axes(exp)) == 1, "parallel",
                         f"exactly one swept field (the change; its first value is the baseline), "
                         f"got {swept_axes(exp) or 'none'}"),
    }
    ok, field, what = need.get(exp.study, (True, "", ""))
    if not ok:
        raise SpecError(f"{path}: field '{field}': a {exp.study} study needs {what}")
    if exp.study == "weak-scaling" and exp.prompts_per_rank is None:
        raise SpecError(f"{path}: field 'prompts_per_rank': a weak-scaling study needs it (prompts per rank, "
                        "so that the work grows with the ranks)")
    if exp.prompts_per_rank is not None and exp.study != "weak-scaling":
        raise SpecError(f"{path}: field 'prompts_per_rank': only used by study: weak-scaling (here: {exp.study})")
    engines = as_list(exp.parallel.engine)
    for engine in sorted(set(engines) - set(taking(engines, "int8"))):
        if "int8" in as_list(exp.model.dtype):
            raise SpecError(f"{path}: field 'model.dtype': int8 (torchao weight-only) runs on the "
                            f"{' and '.join(taking(SELECTABLE, 'int8'))} engines, not {engine}; drop one of them")
    vllm = [e for e in engines if capabilities(e).program == "vllm"]
    if not vllm and "vllm" in exp.model_fields_set:
        raise SpecError(f"{path}: field 'vllm': only used by engine vllm (parallel.engine); remove it or add vllm")
    if vllm and exp.model.trust_remote_code:
        raise SpecError(f"{path}: field 'model.trust_remote_code': engine vllm loads the model with vLLM's own "
                        "model code; add --trust-remote-code to vllm.args if vLLM should run the checkpoint's")



def check_workload(path: Path, exp: Experiment, config: dict | None) -> None:
    """A serving scenario's workload: its file readable and of its layout, its lengths within the model's
    positions (the largest each distribution can draw; normal and lognormal tails without a max are capped by
    the positions when drawn)."""
    from distinfer.serving.sharegpt import WorkloadFileError, read_sharegpt
    from distinfer.serving.traces import read_trace

    scenario = exp.scenario
    for name in ("sharegpt", "sessions", "trace"):
        section = getattr(scenario, name)
        if section is None:
            continue
        try:
            if name == "trace":
                records = read_trace(resolve_path(section.file, path), section.format)
            else:
                read_sharegpt(resolve_path(section.file, path))
        except WorkloadFileError as exc:
            raise SpecError(f"{path}: field 'scenario.{name}.file': {exc}") from None
        limit = max_positions(config) if config is not None and name == "trace" else None
        too_long = next((r for r in records if r.input_tokens + r.output_tokens > limit), None) if limit else None
        if too_long is not None:
            raise SpecError(f"{path}: field 'scenario.trace.file': {section.file}: line {too_long.line}: "
                            f"{too_long.input_tokens} input + {too_long.output_tokens} output tokens exceed the "
                            f"model's {limit} positions")
    limit = max_positions(config) if config is not None else None
    if limit is None:
        return
    parts = {"synthetic": ("input_tokens", "output_tokens"),
             "shared_prefix": ("prefix_tokens", "suffix_tokens", "output_tokens")}.get(scenario.input, ())
    section = getattr(scenario, scenario.input, None)
    largest = {name: getattr(section, name).largest() for name in parts}
    if parts and all(v is not None for v in largest.values()) and sum(largest.values()) > limit:
        said = " + ".join(f"{name} up to {value}" for name, value in largest.items())
        raise SpecError(f"{path}: field 'scenario.{scenario.input}': {said} exceed the model's {limit} positions; "
                        f"allowed: at most {limit} together")
