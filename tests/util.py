"""Helpers shared by tests: images as data URIs, image chats, HF-style pixel batches."""

import base64
import io

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
