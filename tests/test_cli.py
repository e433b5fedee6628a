"""The command lines: the checkpoint writer, `mistral-small run`, `--version` (and GET /version), `serve`'s
port check."""

import json
import socket

import pytest
import torch
from fastapi.testclient import TestClient

from engine.tiny_checkpoint import main as write_main
from server.app import create_app
from server.cli import main as cli_main


def test_writer_command_line(tmp_path, tekken_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "tekken.json").symlink_to(tekken_path)
    write_main([str(out), "--format", "mistral", "--seed", "3"])
    params = json.loads((out / "params.json").read_text())
    assert params["n_kv_heads"] * 4 == params["n_heads"] and (out / "consolidated.safetensors").is_file()
    assert not (out / "config.json").exists()


def test_run_prints_the_answer(tiny_dir, capsys):
    assert cli_main(["run", "Hello", "--model", str(tiny_dir), "--max-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert "prompt + 5 completion tokens, finish: length" in out.err
    assert out.out.strip()


@pytest.mark.parametrize("extra,message", [
    (["--temperature", "-1"], "temperature: must be between 0 and 5"),      # the Workers AI range
    (["--image", "/dev/null"], "image data is empty"),
    (["--model", "/nonexistent/dir"], "not a model directory"),
])
def test_run_reports_bad_input_without_traceback(tiny_dir, capsys, extra, message):
    args = ["run", "Hello", "--max-tokens", "2"] + (["--model", str(tiny_dir)] if "--model" not in extra else [])
    assert cli_main(args + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_chat_keeps_history_and_reports_bad_images(tiny_dir, tmp_path):
    import subprocess
    import sys
    script = "Hello\n/image /nonexistent.png\nAnd again\n/reset\nFresh start\n/exit\n"
    r = subprocess.run([sys.executable, "-m", "server", "chat", "--model", str(tiny_dir), "--max-tokens", "3",
                        "--temperature", "0", "--kv-cache-gib", "0.01"],
                       input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 3 and "error: /nonexistent.png: [Errno 2]" in r.stdout
    prompts = [int(line.split()[0][1:]) for line in r.stderr.splitlines() if line.endswith("completion tokens]")]
    assert len(prompts) == 3 and prompts[1] > prompts[0] + 3 and prompts[2] < prompts[1]   # history, then reset


def test_version_on_the_command_line_and_the_server_agree(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    line = capsys.readouterr().out.strip()
    info = TestClient(create_app(None), base_url="http://127.0.0.1").get("/version").json()
    assert info["version"] and info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert info["cuda_available"] == torch.cuda.is_available()
    assert line.startswith(f"mistral-small-engine {info['version']}") and f"torch {torch.__version__}" in line
    if info["commit"]:                       # a git checkout (CI's clone): the commit it runs
        assert len(info["commit"]) == 40 and info["commit"][:12] in line


def test_serve_refuses_a_busy_port_before_loading_the_model(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # the model does not exist: a port check that came after loading would report that instead
        assert cli_main(["serve", "--port", str(port), "--model", "/nonexistent/dir"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "not a model directory" not in err
