"""Shared fixtures: random-weight checkpoints of the real architecture, written once per session."""

import os
from pathlib import Path

import pytest
import torch
from tools import pytest_runtest_makereport, require_tool  # noqa: F401 - the CI=true report hook

# Without a GPU, Triton kernels (engine/layers/quant_matmul.py) run on CPU tensors through Triton's
# interpreter; the flag is read when a kernel is defined, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.tiny_checkpoint import TINY, write_checkpoint
from engine.tokenizer import write_tekken_v7


@pytest.fixture
def drained(request):
    """Opt in with `pytestmark = pytest.mark.usefixtures("drained")`: after every test that used the module's
    server (`live`), the engine is idle and its KV pool whole."""
    yield
    if "live" in request.fixturenames:
        request.getfixturevalue("live").assert_drained(15)


@pytest.fixture(scope="session")
def tekken_path(tmp_path_factory) -> Path:
    return write_tekken_v7(tmp_path_factory.mktemp("tekken") / "tekken.json")


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tekken_path):
    """make_checkpoint(fmt="hf", keys="4.50", config_style="4.50", seed=0, cfg=TINY) -> directory.
    The same seed gives the same weights in every layout."""
    made = {}

    def make(fmt="hf", keys="4.50", config_style="4.50", seed=0, cfg=TINY) -> Path:
        key = (fmt, keys, config_style, seed, cfg)
        if key not in made:
            d = tmp_path_factory.mktemp(f"ckpt-{fmt}-{keys}-{config_style}-{seed}")
            (d / "tekken.json").symlink_to(tekken_path)
            made[key] = write_checkpoint(d, cfg, fmt, keys, config_style, seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_dir(make_checkpoint) -> Path:
    return make_checkpoint("hf")


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir):
    from engine import LLM
    return LLM(tiny_dir, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_model(tiny_dir):
    """transformers' Mistral3ForConditionalGeneration on the same weights: the reference."""
    from transformers import Mistral3ForConditionalGeneration
    return Mistral3ForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()


@pytest.fixture
def chromium():
    """Debian's headless Chromium driven by Playwright (no browser download): `/usr/bin/chromium`. Per test:
    Playwright's sync API runs an event loop on this thread while it is open, which asyncio.run() elsewhere
    would trip over."""
    exe = require_tool("chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()
