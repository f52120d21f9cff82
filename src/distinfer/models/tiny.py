"""Built-in tiny models, made offline and deterministically: a Llama and a GPT-2 with a local BPE tokenizer.

The model facts (TINY_MODELS) are plain data so that validation can read them without torch;
building imports torch, tokenizers and transformers lazily.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2
# A large initializer_range makes a random model's greedy output vary instead of repeating one token.
INIT_RANGE = 0.1
SEED = 0


@dataclass(frozen=True)
class TinyModel:
    """A built-in model: its transformers architecture and config values."""

    architecture: str
    config: dict = field(default_factory=dict)
    add_bos: bool = True
    trained: bool = False  # a short deterministic training on the corpus: agreement figures then mean something


TINY_MODELS: dict[str, TinyModel] = {
    "tiny-llama": TinyModel(
        "LlamaForCausalLM",
        dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
    ),
    "tiny-gpt2": TinyModel(
        "GPT2LMHeadModel",
        dict(n_embd=256, num_hidden_layers=8, n_head=8, n_positions=4096),
        add_bos=False,
    ),
    # A Mixtral-style mixture of experts (4 experts per layer, 2 per token), trained briefly so that the router's
    # choices are not uniform.
    "tiny-moe": TinyModel(
        "MixtralForCausalLM",
        dict(
            hidden_size=256,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        ),
        trained=True,
    ),
}

TINY_MODELS.update({f"{name}-trained": TinyModel(m.architecture, m.config, m.add_bos, trained=True)
                    for name, m in list(TINY_MODELS.items()) if not m.trained})
TRAIN_STEPS = 120
TRAIN_BATCH = 16
TRAIN_SEQ = 96
TRAIN_LR = 2e-3

# Standard-library modules whose docstrings are the tokenizer's training corpus (offline, fixed order).
CORPUS_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections concurrent.futures configparser contextlib "
    "copy csv dataclasses datetime decimal difflib dis doctest email enum fractions functools gettext glob "
    "hashlib heapq hmac html.parser http.client importlib inspect io ipaddress itertools json locale logging "
    "mailbox math mimetypes multiprocessing numbers operator os pathlib pickle platform pprint queue random re "
    "sched secrets selectors shlex shutil signal socket sqlite3 ssl statistics string struct subprocess "
    "tarfile tempfile textwrap threading timeit tomllib traceback types typing unittest urllib.parse uuid "
    "warnings weakref xml.etree.ElementTree zipfile"
).split()


def cache_dir() -> Path:
    """Where built models (and the CPU probe) live: $DISTINFER_CACHE, else ~/.cache/distinfer."""
    return Path(os.environ.get("DISTINFER_CACHE", Path.home() / ".cache" / "distinfer"))


def tiny_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def corpus_texts() -> list[str]:
    """Docstrings of a fixed list of standard-library modules and their public members."""
    texts: list[str] = []
    with warnings.catch_warnings():  # getmembers touches deprecated aliases (typing.io, typing.re)
        warnings.simplefilter("ignore")
        for module_name in CORPUS_MODULES:
            texts.extend(_module_docs(module_name))
    return list(dict.fromkeys(texts))  # de-duplicate, keep order


def _module_docs(module_name: str) -> list[str]:
    """The module's docstring and those of its members, in name order."""
    module = importlib.import_module(module_name)
    members = [module, *(m for _, m in sorted(inspect.getmembers(module), key=lambda kv: kv[0]))]
    docs = (inspect.getdoc(m) for m in members if not isinstance(m, (str, int, float, bytes)))
    return [d for d in docs if d]


def train_tokenizer(add_bos: bool):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on the corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left"
    )


def build_tiny_model(name: str, force: bool = False) -> Path:
    """Build (or reuse) a built-in model in the cache; returns its folder. Safe against concurrent builds."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; allowed: {', '.join(TINY_MODELS)}")
    target = tiny_model_dir(name)
    if (target / "config.json").is_file() and not force:
        return target
    import torch
    import transformers

    from distinfer.quiet import quiet_transformers

    quiet_transformers()
    spec = TINY_MODELS[name]
    tokenizer = train_tokenizer(spec.add_bos)
    arch = getattr(transformers, spec.architecture)
    config = arch.config_class(
        vocab_size=len(tokenizer),
        initializer_range=INIT_RANGE,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **spec.config,
    )
    torch.manual_seed(SEED)
    model = arch(config)
    if spec.trained:
        train_on_corpus(model, tokenizer)
    model = model.eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if force and target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def train_on_corpus(model, tokenizer) -> list[float]:  # noqa: ANN001
    """A hundred-odd AdamW steps of next-token prediction on the corpus (about a minute on 2 cores); fixed seed
    and order, so the same machine builds the same weights. Returns the loss per step."""
    import torch

    ids = tokenizer("\n\n".join(corpus_texts()), return_tensors="pt")["input_ids"][0]
    chunks = ids[: len(ids) // TRAIN_SEQ * TRAIN_SEQ].view(-1, TRAIN_SEQ)
    generator = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(chunks), generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(TRAIN_STEPS):
        batch = chunks[order[(step * TRAIN_BATCH + torch.arange(TRAIN_BATCH)) % len(chunks)]]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
