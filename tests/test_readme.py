"""The README's promises to a newcomer, read from README.md itself (tests/readme.py): the first command
installs no extra and serves, its first curl request (form-encoded by curl, as written) is answered, the test
command goes through tests/run.py, and the demo is described as the tiny model it is."""

import json
import subprocess

import pytest
from readme import README, first_request, setup_commands
from server_fixture import start_server, tiny_engine
from tools import needs_tool

from engine.tiny_checkpoint import TINY


def test_the_two_setup_commands():
    cmds = setup_commands()
    assert cmds["serve"].endswith("pip install -e . && mistral-small serve")       # serving needs no extra
    assert '.[test]"' in cmds["test"] and cmds["test"].endswith("python tests/run.py")
    with pytest.raises(ValueError, match="one serve line and one test line"):     # CI stops on a README without them
        setup_commands("## Setup\n```bash\npip install -e .\n```\n")


@needs_tool("curl")
def test_the_first_request_of_the_readme_is_answered(tiny_dir):
    live = start_server(tiny_engine(tiny_dir))
    try:
        cmd = first_request().replace("http://127.0.0.1:8000/", f"{live.url}/")
        assert cmd != first_request()
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=False)
        answer = json.loads(r.stdout)
        assert answer["success"] is True and isinstance(answer["result"]["response"], str), r.stdout
        assert answer["result"]["usage"]["completion_tokens"] > 0
        live.assert_drained()
    finally:
        live.stop()


def test_the_demo_is_described_as_the_tiny_model_it_is(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from server import cli
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(cli, "DEMO_DIR", tmp_path / "demo")
    path, demo = cli.default_model()                  # no real weights cached: the demo
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    layers = config["text_config"]["num_hidden_layers"]
    assert demo and path == str(tmp_path / "demo") and layers == TINY.text.num_hidden_layers
    text = " ".join(README.read_text().split())
    assert f"a tiny {layers}-layer model with random weights" in text
    assert "speed and memory say nothing about the 24B model" in text
