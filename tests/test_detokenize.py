"""Incremental detokenization: the streamed pieces join to the whole answer's text, on every tokenizer family
(byte-level BPE as GPT-2's and Llama 3's, SentencePiece-style '▁' words with byte fallback as Llama 2's and
OpenLLaMA's), multi-byte characters included, and the work is linear in the answer's length."""

from __future__ import annotations

import pytest

from distinfer.serving.detokenize import IncrementalDetokenizer

TEXTS = ["Hello world, this is a test.", "naïve café – “quotes” and ünïcödé", "日本語のテキストと中文字符",
         "emoji 🙂🚀 in a row 👩‍👩‍👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "  leading spaces\n\ttabs\nand lines  ", "def f(x):\n    return x ** 2\n"]


def metaspace_tokenizer():  # noqa: ANN201
    """A SentencePiece-style BPE ('▁' for spaces, characters outside the vocabulary as byte tokens <0xNN>, which
    are ordinary tokens, as in Llama 2's vocabulary), trained here."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def shaped(model: models.Model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        return tok

    trained = shaped(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    trained.train_from_iterator(["Hello world this is a test of words and more words"] * 20 + TEXTS[:2], trainer)
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = shaped(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(tiny_models) -> dict:  # noqa: ANN001
    from distinfer.models.loading import load_tokenizer

    return {"byte-level (tiny-llama)": load_tokenizer(tiny_models["tiny-llama"]),
            "byte-level (tiny-gpt2)": load_tokenizer(tiny_models["tiny-gpt2"]),
            "sentencepiece-style": metaspace_tokenizer()}


def streamed(tokenizer, ids: list[int]) -> str:  # noqa: ANN001
    detok = IncrementalDetokenizer.of(tokenizer)
    return "".join(detok.add(t) for t in ids) + detok.flush()


def test_the_pieces_join_to_the_decoded_whole_on_every_family(tokenizers: dict) -> None:
    for family, tokenizer in tokenizers.items():
        for text in TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(ids) > 3
            eos = [tokenizer.eos_token_id]
            for answer in (ids, eos + ids + eos + ids):  # special tokens skipped in the middle, as in the whole
                assert streamed(tokenizer, answer) == tokenizer.decode(answer, skip_special_tokens=True), (family, text)


def test_a_multi_byte_character_is_sent_once_it_is_whole(tokenizers: dict) -> None:
    tokenizer = tokenizers["byte-level (tiny-llama)"]
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the rocket takes several byte tokens"
    detok = IncrementalDetokenizer.of(tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀"


def test_a_long_answer_costs_linear_decoding(tokenizers: dict) -> None:
    """4,000 tokens: the tokens passed to decode grow linearly (a few per token), where decoding the whole
    answer at every token would pass about 8 million."""
    tokenizer = tokenizers["byte-level (tiny-gpt2)"]
    text = " ".join(TEXTS) * 40
    ids = (tokenizer(text, add_special_tokens=False)["input_ids"] * 4)[:4000]
    assert len(ids) == 4000
    decoded = 0

    def counting(window: list[int]) -> str:
        nonlocal decoded
        decoded += len(window)
        return tokenizer.decode(window, skip_special_tokens=True)

    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded < 10 * len(ids), decoded
