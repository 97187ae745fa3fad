"""The Hugging Face Hub for teal's artifacts: a name to a local directory (downloaded when it is a hub id and the
hub is reachable), and a directory uploaded to a repository. Thin wrappers over ``huggingface_hub``."""

from __future__ import annotations

from pathlib import Path


class HubError(ValueError):
    """A hub id could not be resolved (offline, unknown, unreachable)."""


def _offline() -> bool:
    from teal.models import _offline as offline

    return offline()


def local_dir(name_or_path: str | Path, files: list[str], what: str, revision: str | None = None,
              token: str | bool | None = None) -> Path:
    """``name_or_path`` if it exists locally (or looks like a path), else the hub snapshot of those ``files``."""
    path = Path(name_or_path).expanduser()
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        return path
    repo = str(name_or_path)
    if _offline():
        raise HubError(f"{what} {repo!r} is not a local directory, and the hub is offline (HF_HUB_OFFLINE is set): "
                       "pass a local directory, or unset HF_HUB_OFFLINE to download it.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, token=token, allow_patterns=files))
    except (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(f"could not download {what} {repo!r} from the hub ({first}); pass a local directory "
                       "instead.") from e


def upload_dir(directory: str | Path, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
               commit_message: str = "Upload with teal") -> str:
    """Create ``repo_id`` if needed and upload ``directory`` into it; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo, folder_path=str(directory), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
