"""`mistral-small download [REPO] [--format hf|mistral] [--revision R]`: the weights into the standard
Hugging Face cache ($HF_HOME/hub, or $HF_HUB_CACHE), where `serve`, `run` and `chat` find them.

huggingface_hub moves the bytes: its progress bars, several files at a time, a connection dropped mid-file
resumed with a Range request (up to 5 times), files already complete in the cache skipped when the command
is run again. (Since huggingface_hub 1.x the file being written when the process stops starts over on the
next run; the HF format's 5 GB shards bound that loss, the native format's single 48 GB file does not.)

Before the first byte: the size, from the hub's file metadata, is printed, and a disk that cannot hold what
is still missing is refused. Access errors say what to do (gated repo: accept its conditions, set HF_TOKEN).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path


class DownloadError(OSError):
    """The download cannot start or failed; the message says why and what to do."""


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path` (or would: its nearest existing parent)."""
    for p in [path, *path.parents]:
        if p.exists():
            return shutil.disk_usage(p).free
    raise DownloadError(f"{path}: no existing parent directory")


def download(repo: str | None = None, fmt: str = "hf", revision: str | None = None, *,
             cache_dir: str | Path | None = None, endpoint: str | None = None) -> Path:
    """Download one checkpoint format of `repo` (default: the model `serve` uses) and return its snapshot
    directory. `cache_dir`/`endpoint` default to huggingface_hub's (HF_HUB_CACHE / HF_ENDPOINT)."""
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    from engine.weights import _HF_FILES, _NATIVE_FILES, DEFAULT_MODEL

    repo = repo or DEFAULT_MODEL
    for name in ("httpx", "httpx2"):       # one INFO line per request would bury the progress bars
        logging.getLogger(name).setLevel(logging.WARNING)
    patterns = {"hf": _HF_FILES, "mistral": _NATIVE_FILES}[fmt]
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        wanted = list(filter_repo_objects(sizes, allow_patterns=patterns))
        if not wanted:
            raise DownloadError(f"{repo}: no {fmt}-format checkpoint files in this repo (looked for {patterns})")
        missing = [f for f in wanted if not isinstance(
            try_to_load_from_cache(repo, f, cache_dir=cache, revision=info.sha), str)]
        need, total = sum(sizes[f] for f in missing), sum(sizes[f] for f in wanted)
        print(f"{repo} ({fmt} format, commit {info.sha[:12]}): {len(wanted)} files, {_gb(total)}; "
              f"{_gb(need)} to download into {cache}", flush=True)
        free = free_bytes(cache)
        if need > free:
            raise DownloadError(
                f"not enough disk space: {_gb(need)} to download, {_gb(free)} free on the disk of {cache}. "
                f"Free some space, or point HF_HOME (or HF_HUB_CACHE) at a larger disk.")
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, cache_dir=cache,
                                      endpoint=endpoint))
    except DownloadError:
        raise
    except Exception as e:    # every hub/network failure becomes one message, never a traceback
        raise DownloadError(_explain(repo, e, endpoint or constants.ENDPOINT)) from e
    use = "" if repo == DEFAULT_MODEL else f" --model {repo}"
    if fmt == "mistral" and use:
        use += " --load-format mistral"
    print(f"done: {path}\nuse it: mistral-small serve{use}")
    return path


def _explain(repo: str, e: Exception, endpoint: str) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    page = f"{endpoint}/{repo}"
    login = "set HF_TOKEN to an access token of your account (or run `hf auth login`), then run this again"
    if status == 403:
        return f"{repo}: HTTP 403, your token may not read this repo: accept its conditions at {page}, or use a " \
               "token that has access"
    if isinstance(e, GatedRepoError):
        return f"{repo} is gated (HTTP {status}): accept its conditions at {page} while logged in, then {login}."
    if status == 401:
        return f"{repo}: HTTP 401, not authenticated (the repo is private or gated): {login}."
    if isinstance(e, RevisionNotFoundError):
        return f"{repo}: no such revision ({e})"
    if isinstance(e, RepositoryNotFoundError):
        return f"{repo}: no such repo on {endpoint} (if it is private, {login})"
    return f"{repo}: download failed: {type(e).__name__}: {e}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
