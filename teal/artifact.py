"""The thresholds artifact: histograms of activation scores + allocation tables.

On disk it is a directory with ``teal_config.json`` (human-readable metadata and allocation
tables) and ``teal_histograms.safetensors`` (per-site or per-projection score histograms and,
for weight-aware scoring, the weight column norms). No pickle anywhere.

The two files are one artifact, but the directory may hold other files too (a model saved beside it,
a model card), so a save does not swap the whole directory: each file is replaced atomically, and the
config records the sha256 of the histograms file. The config is written first, so a save interrupted
between the two files leaves a new config beside old histograms, which `Thresholds.load` refuses
(the checksum differs) instead of loading mixed content. Files are written with the user's umask.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from teal import sequential, stats
from teal.arch import PROJ_SITE, split_key

FORMAT_VERSION = 2  # 2: sequential-calibration tables ("sequential"); 1 still loads (no tables)
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "teal_config.json"
HISTOGRAMS_NAME = "teal_histograms.safetensors"
SCORES = ("magnitude", "weight-aware")
MAX_SPARSITY = 0.99
CHECKSUM_KEY = "histograms_sha256"  # in teal_config.json: sha256 of teal_histograms.safetensors


class ArtifactError(ValueError):
    """A thresholds artifact is missing, corrupt, or for another model."""


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r} (e.g. 0.5 for 50 %)")
    return s


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(path: Path, err: OSError) -> OSError:
    """The same error, naming the user's path (not the temporary file beside it)."""
    return type(err)(err.errno, f"cannot write {path}: {err.strerror or err}") if err.errno else OSError(
        f"cannot write {path}: {err}")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file beside it, fsync, rename), with the user's
    umask (``tempfile.mkstemp`` alone gives 0600)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with an error that names ``path`` (a parent that is a file, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise NotADirectoryError(e.errno, f"cannot create directory {path}: a file of that name exists") from e
    except OSError as e:
        raise _write_error(path, e) from e


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON so that a reader sees the old file or the whole new one, never a torn one."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, f"cannot write {path}: it is a directory; give a file name (e.g. {path}/results.json)")
    make_dirs(path.parent)
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@dataclass
class Thresholds:
    """Score histograms for every sparsified site, from which any sparsity's thresholds follow.

    ``score == "magnitude"``: one histogram per site (``layers.{i}.{site}``) of |x|.
    ``score == "weight-aware"``: one histogram per projection of |x_i| * ||W[:, i]||_2.
    """

    model: dict[str, Any]
    histograms: dict[str, torch.Tensor]
    proj_sizes: dict[str, int]
    score: str = "magnitude"
    calibration: dict[str, Any] = field(default_factory=dict)
    col_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    allocations: dict[str, dict[str, Any]] = field(default_factory=dict)
    method: str = "uniform"
    #: per allocation method, the sequential-calibration table (teal/sequential.py)
    sequential: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")

    # ---- lookup -------------------------------------------------------------------------
    @property
    def projections(self) -> list[str]:
        return list(self.proj_sizes)

    @property
    def methods(self) -> list[str]:
        return ["uniform", *self.allocations]

    def hist_key(self, proj: str) -> str:
        if self.score == "weight-aware":
            return proj
        layer, p = split_key(proj)
        return f"layers.{layer}.{PROJ_SITE[p]}"

    def col_scale(self, proj: str) -> torch.Tensor | None:
        """Per-input-channel scale c of the threshold rule (None for magnitude scoring)."""
        return self.col_norms.get(proj) if self.score == "weight-aware" else None

    def threshold(self, proj: str, sparsity: float) -> float:
        """Score threshold that zeroes a fraction ``sparsity`` of ``proj``'s input entries.

        ``sparsity == 0`` gives -1: nothing is zeroed (bit-identical to dense).
        """
        s = check_sparsity(sparsity)
        if s == 0.0:
            return -1.0
        key = self.hist_key(proj)
        if key not in self.histograms:
            raise KeyError(f"no calibration histogram for {key!r} (projection {proj!r})")
        return stats.quantile(self.histograms[key], s, name=key)

    def sparsities(self, level: float, method: str | None = None) -> dict[str, float]:
        """Per-projection sparsity for the effective (model-wide) sparsity ``level``."""
        level = check_sparsity(level)
        method = method or self.method
        if method == "uniform":
            return {p: level for p in self.proj_sizes}
        if method not in self.allocations:
            raise ValueError(
                f"this artifact has no {method!r} allocation (it has: {', '.join(self.methods)}); "
                f"run `teal allocate MODEL DIR --method {method}` first."
            )
        table = self.allocations[method]
        levels = table["levels"]
        if level > levels[-1] + 1e-9:
            raise ValueError(
                f"the {method!r} allocation table ends at effective sparsity {levels[-1]:.3f}; "
                f"asked for {level:.3f}."
            )
        # linear interpolation between the two neighbouring rows of the table
        j = max(i for i, lv in enumerate(levels) if lv <= level + 1e-12)
        if j == len(levels) - 1 or levels[j] >= level - 1e-12:
            return {p: float(v[j]) for p, v in table["sparsities"].items()}
        w = (level - levels[j]) / (levels[j + 1] - levels[j])
        return {
            p: float((1 - w) * v[j] + w * v[j + 1]) for p, v in table["sparsities"].items()
        }

    def calibration_mode(self, method: str | None = None, calibration: str | None = None) -> str:
        """``calibration`` if given, else ``"sequential"`` where this artifact has the method's
        sequential table, else ``"dense"``. Asking for ``"sequential"`` without the table is an error."""
        method = method or self.method
        if sequential.check_calibration(calibration) is None:
            return "sequential" if method in self.sequential else "dense"
        if calibration == "sequential" and method not in self.sequential:
            raise ValueError(
                f"this artifact has no sequential calibration for {method!r} (it has: "
                f"{', '.join(self.sequential) or 'none'}); recalibrate with `teal calibrate` (sequential is the "
                f"default{'' if method == 'uniform' else ', then `teal allocate`'}) or use --calibration dense."
            )
        return calibration

    def thresholds(
        self, level: float, method: str | None = None, calibration: str | None = None
    ) -> dict[str, float]:
        """Per-projection thresholds for effective sparsity ``level``.

        ``calibration="dense"``: each projection's quantile of its dense histogram at its nominal
        sparsity. ``"sequential"``: that quantile corrected by the method's sequential table, so that
        the sparsified model zeroes the nominal fraction (teal/sequential.py). Default: the artifact's
        own (sequential where it has the table).
        """
        method = method or self.method
        sparsities = self.sparsities(level, method)
        if self.calibration_mode(method, calibration) == "dense":
            return {p: self.threshold(p, s) for p, s in sparsities.items()}
        table = self.sequential[method]
        grid = [self.sparsities(lv, method) for lv in table["levels"]]
        return {
            p: self.threshold(p, sequential.corrected_quantile(
                s, sequential.offset(table, p, level, [g[p] for g in grid]), MAX_SPARSITY))
            for p, s in sparsities.items()
        }

    def effective(self, sparsities: dict[str, float]) -> float:
        """Parameter-weighted mean of per-projection sparsities."""
        total = sum(self.proj_sizes[p] for p in sparsities)
        return sum(s * self.proj_sizes[p] for p, s in sparsities.items()) / total

    # ---- persistence ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        from teal import __version__

        return {
            "format_version": FORMAT_VERSION,
            "teal_version": __version__,
            "model": self.model,
            "calibration": self.calibration,
            "score": self.score,
            "method": self.method,
            "histogram": {
                "log2_min": stats.LOG2_MIN,
                "log2_max": stats.LOG2_MAX,
                "bins_per_octave": stats.BINS_PER_OCTAVE,
                "num_bins": stats.NUM_BINS,
            },
            "projection_sizes": self.proj_sizes,
            "allocations": self.allocations,
            "sequential": self.sequential,
        }

    def save(self, directory: str | Path) -> Path:
        """Write the artifact directory: each file replaced atomically, the config (with the histograms'
        sha256) first, so an interrupted save never loads as a mix of old and new (see the module doc)."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(20, f"cannot save the thresholds artifact to {d}: it is a file, not a directory")
        make_dirs(d)
        tensors = {f"hist/{k}": v.detach().cpu().long().contiguous() for k, v in self.histograms.items()}
        tensors.update(
            {f"colnorm/{k}": v.detach().cpu().float().contiguous() for k, v in self.col_norms.items()}
        )
        blob = save_safetensors(tensors, metadata={"format_version": str(FORMAT_VERSION)})
        config = {**self.config(), CHECKSUM_KEY: hashlib.sha256(blob).hexdigest()}
        atomic_write_json(d / CONFIG_NAME, config)
        _atomic_write_bytes(d / HISTOGRAMS_NAME, blob)
        return d

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module | None = None) -> Thresholds:
        """Read an artifact; with ``model``, refuse it unless it was calibrated on that model."""
        d = Path(directory)
        if not d.is_dir():
            raise ArtifactError(
                f"thresholds artifact {str(d)!r} does not exist or is not a directory; "
                "create one with `teal calibrate MODEL -o DIR`."
            )
        for name in (CONFIG_NAME, HISTOGRAMS_NAME):
            if not (d / name).is_file():
                raise ArtifactError(
                    f"thresholds artifact {str(d)!r} is incomplete: {name} is missing; "
                    "recalibrate with `teal calibrate MODEL -o DIR`."
                )
        try:
            cfg = json.loads((d / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{d / CONFIG_NAME} is not valid JSON ({e}); recalibrate.") from e
        if not isinstance(cfg, dict) or cfg.get("format_version") not in READABLE_VERSIONS:
            raise ArtifactError(
                f"{d / CONFIG_NAME}: unsupported format_version "
                f"{cfg.get('format_version') if isinstance(cfg, dict) else None!r} "
                f"(this teal reads {', '.join(map(str, READABLE_VERSIONS))})."
            )
        hist_cfg = cfg.get("histogram", {})
        if hist_cfg.get("num_bins") != stats.NUM_BINS or hist_cfg.get(
            "bins_per_octave"
        ) != stats.BINS_PER_OCTAVE:
            raise ArtifactError(f"{d}: histogram grid {hist_cfg} differs from this teal's; recalibrate.")
        try:
            blob = (d / HISTOGRAMS_NAME).read_bytes()
            tensors = load_safetensors(blob)
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"{d / HISTOGRAMS_NAME} is unreadable ({e}); recalibrate.") from e
        expected = cfg.get(CHECKSUM_KEY)
        if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
            raise ArtifactError(
                f"{d / HISTOGRAMS_NAME} does not match {d / CONFIG_NAME} (sha256 differs from the recorded one): "
                "a save was interrupted or a file was replaced by hand; save the artifact again or recalibrate "
                "(teal calibrate MODEL -o DIR)."
            )
        try:
            th = cls(
                model=cfg["model"],
                histograms={k[5:]: v for k, v in tensors.items() if k.startswith("hist/")},
                col_norms={k[8:]: v for k, v in tensors.items() if k.startswith("colnorm/")},
                proj_sizes={k: int(v) for k, v in cfg["projection_sizes"].items()},
                score=cfg["score"],
                calibration=cfg.get("calibration", {}),
                allocations=cfg.get("allocations", {}),
                method=cfg.get("method", "uniform"),
                sequential=cfg.get("sequential", {}),  # absent in format 1
            )
            for m, table in th.sequential.items():
                sequential.check_table(table, th.projections, f"{d / CONFIG_NAME}: sequential[{m!r}]")
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{d / CONFIG_NAME} is missing or has a bad field: {e}") from e
        missing = {th.hist_key(p) for p in th.proj_sizes} - set(th.histograms)
        if missing:
            raise ArtifactError(
                f"{d / HISTOGRAMS_NAME} lacks histograms for {sorted(missing)[:3]}…; recalibrate."
            )
        th.validate(d)
        if model is not None:
            th.check_model(model)
        return th

    def validate(self, where: str | Path = "the thresholds") -> None:
        """Raise :class:`ArtifactError` unless every histogram, column norm and allocation table is usable:
        a histogram has the grid's bin count and finite, non-negative, integral counts that are not all zero;
        a column norm is finite and non-negative; an allocation's sparsities are finite, in [0, 1).
        ``where``: the artifact directory, named in the message."""
        hist_file = Path(where) / HISTOGRAMS_NAME if isinstance(where, Path) else where
        cfg_file = Path(where) / CONFIG_NAME if isinstance(where, Path) else where
        for key, counts in self.histograms.items():
            problem = stats.counts_problem(counts)
            if problem:
                raise ArtifactError(
                    f"{hist_file}: the histogram of {key!r} {problem}; the file is corrupt. Recalibrate "
                    "(teal calibrate MODEL -o DIR)."
                )
        for key, norms in self.col_norms.items():
            bad = norms.dim() != 1 or not bool(torch.isfinite(norms.float()).all()) or bool((norms < 0).any())
            if bad:
                raise ArtifactError(
                    f"{hist_file}: the weight column norms of {key!r} are not a vector of finite, non-negative "
                    "values; the file is corrupt. Recalibrate (teal calibrate MODEL -o DIR --score weight-aware)."
                )
        if self.score == "weight-aware":
            lacking = sorted(set(self.proj_sizes) - set(self.col_norms))
            if lacking:
                raise ArtifactError(
                    f"{hist_file} holds weight-aware histograms but no column norms for {lacking[:3]}; recalibrate "
                    "(teal calibrate MODEL -o DIR --score weight-aware)."
                )
        for method, table in self.allocations.items():
            try:
                levels = [float(v) for v in table["levels"]]
                rows = {p: [float(x) for x in v] for p, v in table["sparsities"].items()}
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ArtifactError(f"{cfg_file}: the {method!r} allocation table is malformed ({e}); "
                                    f"run `teal allocate MODEL DIR --method {method}` again.") from e
            values = levels + [x for v in rows.values() for x in v]
            if any(not (0.0 <= x < 1.0) for x in values) or any(len(v) != len(levels) for v in rows.values()):
                raise ArtifactError(
                    f"{cfg_file}: the {method!r} allocation table has sparsities outside [0, 1) or rows of the "
                    f"wrong length; run `teal allocate MODEL DIR --method {method}` again."
                )

    def save_pretrained(self, save_directory: str | Path, push_to_hub: bool = False,
                        repo_id: str | None = None, **hub_kwargs: Any) -> Path:
        """``save`` (the transformers spelling); with ``push_to_hub``, upload it too."""
        d = self.save(save_directory)
        if push_to_hub:
            self.push_to_hub(repo_id or d.name, **hub_kwargs)
        return d

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, model: torch.nn.Module | None = None,
                        revision: str | None = None, token: str | bool | None = None) -> Thresholds:
        """An artifact directory, a model directory saved after ``teal.sparsify_`` (its thresholds are inside),
        or a hub id (downloaded through ``huggingface_hub`` unless offline)."""
        from teal.hub import HubError, local_dir

        try:
            d = local_dir(name_or_path, [CONFIG_NAME, HISTOGRAMS_NAME], "thresholds", revision, token)
        except HubError as e:
            raise ArtifactError(str(e)) from e
        if d.is_dir() and not (d / CONFIG_NAME).is_file() and (d / "config.json").is_file():
            th = from_model_dir(d)
            if model is not None:
                th.check_model(model)
            return th
        return cls.load(d, model=model)

    def push_to_hub(self, repo_id: str, commit_message: str = "Upload TEAL thresholds", **hub_kwargs: Any) -> str:
        """Upload the artifact to a hub repository (``huggingface_hub``); returns the commit URL."""
        from teal.hub import upload_dir

        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            return upload_dir(tmp, repo_id, commit_message=commit_message, **hub_kwargs)

    @classmethod
    def from_tensors(cls, cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> Thresholds:
        """From a ``teal_config.json`` dict and the ``hist/`` / ``colnorm/`` tensors (as a sparsified model's
        checkpoint carries them)."""
        if cfg.get("format_version") not in READABLE_VERSIONS or cfg.get("histogram", {}).get("num_bins") != stats.NUM_BINS:
            raise ArtifactError(f"{where}: its teal thresholds (format {cfg.get('format_version')!r}) are not a "
                                f"format this teal reads ({READABLE_VERSIONS}); sparsify the dense model again.")
        try:
            return cls(
                model=cfg["model"],
                histograms={k[5:]: v for k, v in tensors.items() if k.startswith("hist/")},
                col_norms={k[8:]: v for k, v in tensors.items() if k.startswith("colnorm/")},
                proj_sizes={k: int(v) for k, v in cfg["projection_sizes"].items()},
                score=cfg["score"], calibration=cfg.get("calibration", {}),
                allocations=cfg.get("allocations", {}), method=cfg.get("method", "uniform"),
                sequential=cfg.get("sequential", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: the teal thresholds' config is missing or has a bad field: {e}") from e

    def check_config(self, config: Any, name: str | None = None) -> None:
        """Raise :class:`ArtifactError` unless an HF config (of a checkpoint not loaded: tensor-parallel
        decoding) has the architecture and sizes these were calibrated on. Weaker than `check_model`:
        the weights' fingerprint needs the loaded model."""
        from teal.models import _text_config

        cfg = _text_config(config)
        info = {"model_type": getattr(cfg, "model_type", None), "n_layers": getattr(cfg, "num_hidden_layers", None),
                "hidden_size": getattr(cfg, "hidden_size", None),
                "intermediate_size": getattr(cfg, "intermediate_size", None)}
        mine = self.model
        for field_name, value in info.items():
            if value != mine.get(field_name):
                raise ArtifactError(
                    f"thresholds were calibrated on {mine.get('name_or_path')!r} "
                    f"({field_name}={mine.get(field_name)}), not on {name or 'this checkpoint'!r} "
                    f"({field_name}={value}); calibrate this model first."
                )

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`ArtifactError` unless ``model`` is the model these were calibrated on."""
        from teal.models import model_info

        # a sparsified model keeps the info of its dense self (its parameter names changed)
        self.check_info(getattr(model, "teal_model_info", None) or model_info(model))

    def check_checkpoint(self, directory: str | Path) -> None:
        """`check_model` for an HF checkpoint directory not loaded as a model (the engine reads its
        safetensors directly): the same sizes and weights fingerprint, read without loading the weights."""
        from teal.models import checkpoint_info

        self.check_info(checkpoint_info(directory))

    def check_info(self, info: dict[str, Any]) -> None:
        """Raise :class:`ArtifactError` unless ``info`` (`teal.models.model_info`) is the calibrated model's.
        A quantized model (`teal.quantize_weights`) also carries its checkpoint's ``dense_fingerprint``, so the
        same checkpoint matches in any weight format (bf16 for the engine, which quantizes after loading);
        a format, group size or method that differs from the calibration's is a warning of the CLI
        (`teal.quant.weights_mismatch`), not an error here."""
        mine = self.model
        for field_name in ("model_type", "n_layers", "hidden_size", "intermediate_size"):
            if info.get(field_name) != mine.get(field_name):
                raise ArtifactError(
                    f"thresholds were calibrated on {mine.get('name_or_path')!r} "
                    f"({field_name}={mine.get(field_name)}), not on {info.get('name_or_path')!r} "
                    f"({field_name}={info.get(field_name)}); calibrate this model first."
                )
        prints = lambda d: {d.get("fingerprint"), d.get("dense_fingerprint")} - {None}  # noqa: E731
        if info.get("fingerprint") != mine.get("fingerprint") and not prints(info) & prints(mine):
            raise ArtifactError(
                f"thresholds were calibrated on {mine.get('name_or_path')!r} "
                f"(fingerprint {mine.get('fingerprint')}), but the model given is "
                f"{info.get('name_or_path')!r} (fingerprint {info.get('fingerprint')}): same shape, "
                "different weights. Calibrate this model first."
            )


# ---- the thresholds inside a model checkpoint saved after teal.sparsify_ (teal.quantizer writes them) ----------
QUANT_METHOD = "teal"  # config.json's quantization_config.quant_method
MODEL_TENSOR_PREFIX = "teal.thresholds."  # the artifact's tensors inside the model's safetensors


def from_checkpoint(files: list[str], cfg: dict[str, Any], where: str) -> Thresholds:
    """The thresholds stored inside a sparsified model's safetensors ``files`` (``cfg``: the artifact config)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            continue
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key.startswith(MODEL_TENSOR_PREFIX):
                    tensors[key[len(MODEL_TENSOR_PREFIX):]] = sf.get_tensor(key)
    if not tensors:
        raise ArtifactError(f"{where}: config.json says the model is teal-sparsified, but its safetensors hold no "
                            f"{MODEL_TENSOR_PREFIX}* tensors; save it again with model.save_pretrained after "
                            "teal.sparsify_.")
    return Thresholds.from_tensors(cfg, tensors, where)


def from_model_dir(path: Path) -> Thresholds:
    """The thresholds of a model directory saved after ``teal.sparsify_``."""
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path / 'config.json'} is unreadable ({e})") from e
    if qc.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{path} is a model directory without teal thresholds (no {CONFIG_NAME}, and its "
                            "config.json is not teal-sparsified); pass the artifact from `teal calibrate`.")
    return from_checkpoint(sorted(map(str, path.glob("*.safetensors"))), qc.get("artifact", {}), str(path))
