"""Publishing trained heads to the Hugging Face Hub, and seeding a local Hub cache for offline use.

Publishing is one command (needs ``huggingface-cli login`` or ``HF_TOKEN``)::

    hf-decoding-ext publish eagle --repo-id <user>/smollm2-135m-instruct-eagle-fspad

which uploads the checkpoint's ``config.json``, ``model.safetensors`` and its model card (``README.md``, from
``model_cards/``). Users then load it by id, e.g. ``EagleDrafter("<user>/smollm2-135m-instruct-eagle-fspad")``;
``from_pretrained`` reads the Hugging Face cache, so once downloaded (or seeded with :func:`seed_hub_cache`) it
loads with ``HF_HUB_OFFLINE=1``. Loading never executes remote code: the head classes are this library's own.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

CHECKPOINT_FILES = ("config.json", "model.safetensors", "README.md")


def _resolve_folder(kind_or_path) -> Path:
    from hf_decoding_ext.speculative.drafters.feature_head import SHIPPED, shipped_head_path

    if str(kind_or_path) in SHIPPED:
        return shipped_head_path(str(kind_or_path))
    path = Path(kind_or_path)
    if not (path / "config.json").exists():
        raise ValueError(f"{kind_or_path!r} is neither a shipped head kind ({sorted(SHIPPED)}) nor a checkpoint folder")
    return path


def checkpoint_files(kind_or_path) -> list[Path]:
    """The files a head checkpoint publishes (weights are safetensors only)."""
    folder = _resolve_folder(kind_or_path)
    files = [folder / f for f in CHECKPOINT_FILES if (folder / f).exists()]
    if not (folder / "model.safetensors").exists():
        raise ValueError(f"{folder} has no model.safetensors")
    if any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in folder.iterdir()):
        raise ValueError(f"{folder} holds pickle weights; only safetensors are published")
    return files


def publish(kind_or_path, repo_id: str, *, private: bool = False, token: str | None = None,
            dry_run: bool = False) -> list[str]:
    """Upload a head checkpoint (a shipped kind or a folder) to ``repo_id``; returns the uploaded file names.
    ``dry_run`` only lists them (no network)."""
    if "/" not in repo_id:
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    files = checkpoint_files(kind_or_path)
    names = [p.name for p in files]
    if dry_run:
        return names
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    for p in files:
        api.upload_file(path_or_fileobj=str(p), path_in_repo=p.name, repo_id=repo_id)
    return names


def seed_hub_cache(kind_or_path, repo_id: str, cache_dir, revision: str = "main") -> Path:
    """Lay a checkpoint out in ``cache_dir`` exactly as ``huggingface_hub`` caches a downloaded model repo
    (``models--{org}--{name}/snapshots/<commit>/...`` and ``refs/<revision>``), so that
    ``from_pretrained(repo_id)`` works offline (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE=cache_dir``). Returns the
    snapshot folder."""
    files = checkpoint_files(kind_or_path)
    digest = hashlib.sha1()
    for p in files:
        digest.update(p.read_bytes())
    commit = digest.hexdigest()
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    blobs = repo / "blobs"
    blobs.mkdir(exist_ok=True)
    for p in files:
        blob = blobs / hashlib.sha256(p.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(p, blob)
        target = snapshot / p.name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snapshot
