"""Uploads to the Hugging Face hub (``push_to_hub``) through huggingface_hub's HfApi."""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import UserError


class HubError(UserError):
    """The upload failed; the local copy it was made from is complete."""


def push_folder(folder: Path, repo_id: str, private: bool | None = None, what: str = "the adapter") -> str:
    """Create ``repo_id`` if needed and upload ``folder``; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {what} trained with rlhf")
    except Exception as exc:  # the network boundary: offline, auth, HTTP errors of any client library
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise HubError(f"could not push {folder} to the hub as {repo_id} ({type(exc).__name__}: {reason}); the local "
                       f"copy is complete; push it later with: huggingface-cli upload {repo_id} {folder}") from None
    return str(url)
