"""Thresholds artifacts on the Hugging Face Hub: resolve an id to a local directory, upload one.

Thin wrappers over ``huggingface_hub``; the artifact format itself is :mod:`teal.artifact`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

from teal.artifact import CONFIG_NAME, HISTOGRAMS_NAME, ArtifactError, Thresholds


def _offline() -> bool:
    from teal.models import _offline as offline

    return offline()


def load_thresholds(name_or_path: str | Path, model=None, revision: str | None = None,
                    token: str | bool | None = None) -> Thresholds:
    """``Thresholds.from_pretrained``: an artifact directory, a model directory saved after
    ``teal.sparsify_`` (its thresholds are inside), or a hub id (downloaded unless offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / "config.json").is_file():
        return _from_model_dir(path, model)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        return Thresholds.load(path, model=model)
    repo = str(name_or_path)
    if _offline():
        raise ArtifactError(
            f"thresholds {repo!r} is not a local directory, and the hub is offline (HF_HUB_OFFLINE is set): pass a "
            "local artifact directory, or unset HF_HUB_OFFLINE to download it.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        local = snapshot_download(repo, revision=revision, token=token, allow_patterns=[CONFIG_NAME, HISTOGRAMS_NAME])
    except (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"could not download thresholds {repo!r} from the hub ({first}); pass a local "
                            "artifact directory instead.") from e
    return Thresholds.load(local, model=model)


def _from_model_dir(path: Path, model) -> Thresholds:
    from teal.quantizer import QUANT_METHOD, read_checkpoint_thresholds

    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{path} is a model directory without teal thresholds (no {CONFIG_NAME}, and its "
                            "config.json is not teal-sparsified); pass the artifact from `teal calibrate`.")
    th = read_checkpoint_thresholds(sorted(map(str, path.glob("*.safetensors"))), qc.get("artifact", {}), str(path))
    if model is not None:
        th.check_model(model)
    return th


def push_thresholds(th: Thresholds, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str = "Upload TEAL thresholds") -> str:
    """Write the artifact to a temporary directory and upload it to ``repo_id``; returns the commit URL."""
    import tempfile

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        th.save(tmp)
        info = api.upload_folder(repo_id=repo, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
