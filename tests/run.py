"""The test command of the README and of CI:

    python tests/run.py [pytest arguments]

installs the tools in tests/tools.py that are missing (Debian and npm packages; pip's are the test extra's),
then runs pytest with them on PATH. Quick when everything is already there: nothing is installed twice.
"""

import os
import subprocess
import sys

from tools import install, missing, tool_path


def main(argv: list[str]) -> int:
    todo = [t for t in missing() if t.source != "pip"]
    if todo:
        print(f"installing {', '.join(t.package for t in todo)} for the tests", flush=True)
        install(todo)
    absent = [t for t in missing() if t.source == "pip"]
    if absent:
        print(f"not installed: {', '.join(t.package for t in absent)}: the tests that need them are skipped "
              f"(failed under CI=true); pip install -e '.[test]' installs them", flush=True)
    still = [t.name for t in missing() if t.source != "pip"]
    if still:
        print(f"error: still missing after installing: {', '.join(still)}", file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, "-m", "pytest", *argv], env={**os.environ, "PATH": tool_path()})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
