"""`python -m server --model PATH --host H --port P` starts the server (`serve` is the default command)."""

import sys

from server.cli import main

argv = sys.argv[1:]
if not argv or argv[0] not in ("serve", "run", "chat", "download", "-h", "--help", "--version"):
    argv = ["serve"] + argv
sys.exit(main(argv))
