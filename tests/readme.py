"""The README's runnable parts, read from README.md itself, so that CI (.ci/run) and the tests run exactly
what it tells a newcomer to run:

    python tests/readme.py serve      the setup line that installs and serves
    python tests/readme.py test       the setup line that installs and runs the tests
    python tests/readme.py request    the first curl example (a request to http://127.0.0.1:8000)
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def setup_commands(text: str | None = None) -> dict[str, str]:
    """{"serve": ..., "test": ...}: the lines of the first bash block under "## Setup", comments dropped."""
    text = README.read_text() if text is None else text
    block = re.search(r"^## Setup.*?```bash\n(.*?)```", text, re.DOTALL | re.MULTILINE)
    if not block:
        raise ValueError("README.md has no bash block under '## Setup'")
    lines = [re.sub(r"\s+#.*$", "", line) for line in block.group(1).splitlines() if line.strip()]
    found = {"serve": [ln for ln in lines if ln.endswith("mistral-small serve")],
             "test": [ln for ln in lines if "tests/run.py" in ln]}
    if any(len(v) != 1 for v in found.values()):
        raise ValueError(f"README.md's Setup block must hold one serve line and one test line, found {found}")
    return {k: v[0] for k, v in found.items()}


def first_request(text: str | None = None) -> str:
    """The README's first `curl` command, with its continuation lines."""
    text = README.read_text() if text is None else text
    m = re.search(r"^curl (?:[^\n]*\\\n)*[^\n]*", text, re.MULTILINE)
    if not m:
        raise ValueError("README.md has no curl example")
    return m.group(0)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) == 2 else ""
    if what not in ("serve", "test", "request"):
        sys.exit(__doc__)
    print(first_request() if what == "request" else setup_commands()[what])
