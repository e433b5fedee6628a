"""`mistral-small download` against a stand-in hub on loopback (tests/stand_in_hub.py): a dropped connection
resumed with a Range request, the cache `serve` reads, a disk too small refused before the first byte,
a gated repo's 401, one format's files only."""

import os
import subprocess
import sys

import pytest
from stand_in_hub import StandInHub

from engine.weights import DEFAULT_MODEL
from server import download as dl


def _cli(args, hub, home, **env):
    # HF_HOME also holds the token file `hf auth login` writes: none there unless HF_TOKEN is given
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    env = {**base, "HF_HOME": str(home), "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", **env}
    return subprocess.run([sys.executable, "-m", "server", *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_download_resumes_a_dropped_connection_into_the_cache_serve_reads(tiny_dir, tmp_path):
    with StandInHub.from_dir(DEFAULT_MODEL, tiny_dir) as hub:
        shard = next(n for n in hub.files if n.endswith(".safetensors"))
        cut = len(hub.files[shard]) // 3
        hub.drop_after[shard] = cut
        r = _cli(["download"], hub, tmp_path)
        assert r.returncode == 0, r.stderr
        total = sum(len(d) for d in hub.files.values())
        assert f"{len(hub.files)} files, {total / 1e6:.2f} MB; {total / 1e6:.2f} MB to download" in r.stdout
        first, resumed = hub.gets(shard)                           # cut once, then resumed, not restarted:
        assert first is None and 0 < int(resumed.removeprefix("bytes=").rstrip("-")) <= cut   # (whole chunks kept)
        snapshot = r.stdout.split("done: ")[1].split("\n")[0]
        for name, data in hub.files.items():
            assert (tmp_path / "hub" / snapshot.split("/hub/")[1] / name).read_bytes() == data, name

        again = _cli(["download"], hub, tmp_path)                     # complete files are not fetched again
        assert again.returncode == 0 and "0.00 MB to download" in again.stdout
        assert len(hub.gets(shard)) == 2

        # without --model, serve/run/chat take the real model from the cache (no demo), offline too
        find = subprocess.run([sys.executable, "-c", "from server.cli import default_model; print(default_model())"],
                              env={**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"},
                              capture_output=True, text=True, timeout=120, check=False)
        assert find.stdout.strip() == repr((snapshot, False)), find.stderr


def test_download_refuses_a_disk_too_small_before_the_first_byte(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "free_bytes", lambda path: 10**6)
    with StandInHub.from_dir(DEFAULT_MODEL, tiny_dir) as hub:
        with pytest.raises(dl.DownloadError, match=r"not enough disk space: .* MB to download, 1.00 MB free"):
            dl.download(cache_dir=tmp_path, endpoint=hub.url)
        assert not any("/resolve/" in path for _, path, _ in hub.requests)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_gated_repo_401_says_to_set_hf_token(tiny_dir, tmp_path):
    with StandInHub.from_dir("someone/gated-model", tiny_dir) as hub:
        hub.gated = True
        r = _cli(["download", "someone/gated-model"], hub, tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert "is gated (HTTP 401)" in r.stderr and "set HF_TOKEN" in r.stderr and "hf auth login" in r.stderr
        assert f"accept its conditions at {hub.url}/someone/gated-model" in r.stderr
        assert not list(tmp_path.rglob("*.safetensors"))

        r = _cli(["download", "someone/gated-model"], hub, tmp_path, HF_TOKEN=hub.token)
        assert r.returncode == 0, r.stderr
        assert "use it: mistral-small serve --model someone/gated-model" in r.stdout


def test_format_selects_the_files_the_loader_reads(tmp_path):
    files = {n: n.encode() for n in ("config.json", "model-00001-of-00001.safetensors", "tekken.json",
                                     "model.safetensors.index.json", "params.json", "consolidated.safetensors",
                                     "README.md")}
    with StandInHub("org/both", files) as hub:
        path = dl.download("org/both", "mistral", cache_dir=tmp_path, endpoint=hub.url)
        assert sorted(p.name for p in path.iterdir()) == ["consolidated.safetensors", "params.json", "tekken.json"]
        path = dl.download("org/both", "hf", cache_dir=tmp_path, endpoint=hub.url)
        assert sorted(p.name for p in path.iterdir()) == sorted(files.keys() - {"README.md"})
