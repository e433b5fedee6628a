"""The test command's tool mechanism (tests/tools.py, tests/run.py): what is missing gets installed, what is
there is left alone, and under CI=true a test whose tool is missing fails instead of skipping."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tools import NPM_DIR, Tool, install, missing

HERE = Path(__file__).resolve().parent


def test_install_runs_apt_get_and_npm_for_the_missing_tools_only():
    ghost = Tool("ghost", "debian", "ghost-pkg", "no-such-executable-x7q")
    phantom = Tool("phantom", "npm", "phantom-cli@1.2.3", "no-such-executable-y8r")
    shell = Tool("shell", "debian", "dash", "sh")                    # present: nothing to do
    ran = []
    commands = install(missing([ghost, phantom, shell]), run=lambda cmd, **kw: ran.append(cmd))
    assert ran == commands
    assert [c[-2:] for c in ran[:2]] == [["update", "-q"], ["--no-install-recommends", "ghost-pkg"]]
    assert ran[0][-3] == ran[1][-6] == "apt-get" and ran[2] == ["npm", "install", "--no-audit", "--no-fund",
                                                               "--prefix", str(NPM_DIR), "phantom-cli@1.2.3"]
    assert install(missing([shell]), run=lambda cmd, **kw: ran.append(cmd)) == []   # idempotent


def test_a_missing_tool_skips_here_and_fails_under_ci(tmp_path):
    (tmp_path / "test_needs_ghost.py").write_text(textwrap.dedent("""
        import pytest
        from tools import Tool, needs_tool

        @needs_tool(Tool("ghost", "debian", "ghost-pkg", "no-such-executable-x7q"))
        def test_ghost():
            pass

        def test_import():
            pytest.importorskip("no_such_module_z9")
    """))

    def run(ci):
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        if ci:
            env["CI"] = "true"
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "tools", "-q", "-rA", "-p", "no:cacheprovider",
                               str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, check=False)

    here = run(ci=False)
    assert here.returncode == 0 and "2 skipped" in here.stdout, here.stdout
    ci = run(ci=True)
    assert ci.returncode == 1 and "1 failed, 1 error" in ci.stdout, ci.stdout    # error: a skip at setup
    assert "CI=true, so this is a failure, not a skip: missing tool: ghost" in ci.stdout


def test_run_py_installs_nothing_when_everything_is_there_and_passes_arguments_to_pytest():
    r = subprocess.run([sys.executable, str(HERE / "run.py"), "--collect-only", "-q", str(HERE / "test_tools.py")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing" not in r.stdout and "3 tests collected" in r.stdout
