"""Upload a converted repo to the Hugging Face Hub."""

from pathlib import Path

import huggingface_hub


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None, api=None) -> str:
    """Create `repo_id` (if needed), and the branch `revision` (if given), then upload every file of `folder`.

    `api` defaults to `huggingface_hub.HfApi()` (token from `hf auth login` or HF_TOKEN); upload_folder shows
    tqdm progress bars for the large files. Returns the commit URL.
    """
    api = api if api is not None else huggingface_hub.HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        revision=revision,
        commit_message="Add ST-GridPool model (converted with stgridpool-convert)",
    )
    return str(getattr(commit, "commit_url", commit))
