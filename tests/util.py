"""Helpers shared by tests: images as data URIs, image chats, HF-style pixel batches, load memory."""

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def data_uri(w: int, h: int, seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(sizes, text="Describe these.", seed=0):
    parts = [{"type": "image_url", "image_url": {"url": data_uri(w, h, seed + i)}}
             for i, (w, h) in enumerate(sizes)]
    return [{"role": "system", "content": "You see images."},
            {"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def hf_pixels(images: list[np.ndarray]):
    """transformers takes one zero-padded batch plus each image's true size."""
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    pv = torch.zeros(len(images), 3, h, w)
    for k, img in enumerate(images):
        pv[k, :, :img.shape[1], :img.shape[2]] = torch.from_numpy(img)
    return pv, torch.tensor([[i.shape[1], i.shape[2]] for i in images])


def hf_greedy(hf_model, ids: list[int], n: int, images=()) -> list[int]:
    extra = {}
    if images:
        extra["pixel_values"], extra["image_sizes"] = hf_pixels(list(images))
    out = hf_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            **extra)
    return out[0, len(ids):].tolist()


def measure_load(ckpt, quantization: str | None = None, timeout: int = 300) -> dict:
    """Anonymous memory of loading `ckpt` in a fresh process (tests/memory_probe.py), in bytes.
    Allocations >= 1 MiB get their own mapping and go back to the system when freed, so RSS follows the live
    tensors (like torch.cuda.max_memory_allocated on a GPU); otherwise glibc keeps 30-60 MiB of freed chunks
    in its heap, varying from run to run."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    probe = Path(__file__).with_name("memory_probe.py")
    r = subprocess.run([sys.executable, str(probe), str(ckpt), quantization or "none"], capture_output=True,
                       text=True, timeout=timeout, env=env, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)
