"""The command lines: the checkpoint writer and `mistral-small run`."""

import json

import pytest

from engine.tiny_checkpoint import main as write_main
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
    assert r.stdout.count("assistant> ") == 3 and "error: [Errno 2]" in r.stdout
    prompts = [int(line.split()[0][1:]) for line in r.stderr.splitlines() if line.endswith("completion tokens]")]
    assert len(prompts) == 3 and prompts[1] > prompts[0] + 3 and prompts[2] < prompts[1]   # history, then reset
