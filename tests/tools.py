"""The tools tests drive besides Python imports, and how they get installed.

pip installs what the `test` extra lists. What pip cannot install (Debian packages such as a browser and its
driver, npm packages, peer clients) is listed in TOOLS and installed by tests/run.py, the README's test
command, before pytest starts: apt-get (as root, else through sudo) and `npm install --prefix tests/.tools`,
whose bin folder run.py puts on PATH. Already-present tools are not touched, so a second run costs nothing.

A test that needs a tool carries `@needs_tool("name")`: skipped where the tool is missing, except under
CI=true, where this module's report hook turns that skip into a failure: CI never passes by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

NPM_DIR = Path(__file__).resolve().parent / ".tools"
MISSING = "missing tool"                 # the skip reason's prefix that CI turns into a failure


@dataclass(frozen=True)
class Tool:
    name: str           # what tests ask for
    source: str         # "debian" (apt-get), "npm", or "pip" (the test extra: checked, never installed here)
    package: str        # what to install: a Debian package, an npm spec ("name@version"), a pip requirement
    provides: str       # present when this executable (debian, npm) or module (pip) is found

    def present(self) -> bool:
        if self.source == "pip":
            return importlib.util.find_spec(self.provides) is not None
        return shutil.which(self.provides, path=tool_path()) is not None


# an npm entry looks like Tool("x", "npm", "x@1.2.3", "x"): installed under tests/.tools, its bin on PATH
TOOLS = [
    Tool("curl", "debian", "curl", "curl"),      # the README's first request, sent as the README sends it
    Tool("chromium", "debian", "chromium", "chromium"),     # the /docs page, driven by playwright (pip)
    Tool("bitsandbytes", "pip", "bitsandbytes", "bitsandbytes"),
    Tool("accelerate", "pip", "accelerate", "accelerate"),
    Tool("triton", "pip", "triton", "triton"),
]
BY_NAME = {t.name: t for t in TOOLS}


def tool_path() -> str:
    """PATH with the npm tools first."""
    return os.pathsep.join([str(NPM_DIR / "node_modules" / ".bin"), os.environ.get("PATH", "")])


def missing(tools: list[Tool] = TOOLS) -> list[Tool]:
    return [t for t in tools if not t.present()]


def install(tools: list[Tool], run=subprocess.run) -> list[list[str]]:
    """Install the Debian and npm tools among `tools` (the missing ones); returns the commands it ran."""
    commands = []
    debian = [t.package for t in tools if t.source == "debian"]
    if debian:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        commands += [sudo + ["apt-get", "update", "-q"],
                     sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *debian]]
    npm = [t.package for t in tools if t.source == "npm"]
    if npm:
        commands.append(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR), *npm])
    for cmd in commands:
        run(cmd, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return commands


def _reason(names: list[str]) -> str:
    return f"{MISSING}: {', '.join(names)} (python tests/run.py installs the Debian and npm ones; pip install -e " \
           "'.[test]' the others)"


def needs_tool(*tools: str | Tool) -> pytest.MarkDecorator:
    """Mark: the test needs these tools (names in TOOLS, or Tool objects)."""
    wanted = [BY_NAME[t] if isinstance(t, str) else t for t in tools]
    absent = [t.name for t in missing(wanted)]
    return pytest.mark.skipif(bool(absent), reason=_reason(absent))


def require_tool(name: str) -> str:
    """In a fixture or test: the tool's executable (or module name), or the missing-tool skip."""
    tool = BY_NAME[name]
    if not tool.present():
        pytest.skip(_reason([name]))
    return tool.provides if tool.source == "pip" else shutil.which(tool.provides, path=tool_path())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test skipped for a missing tool (or a failed pytest.importorskip) fails instead."""
    report = yield
    if report.skipped and os.environ.get("CI") == "true" and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        if MISSING in reason or "could not import" in reason:
            report.outcome = "failed"
            report.longrepr = f"CI=true, so this is a failure, not a skip: {reason}"
    return report
