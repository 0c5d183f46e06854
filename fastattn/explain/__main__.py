"""``python -m fastattn.explain ...``: the same as ``fastattn explain ...``."""
import sys

from fastattn.cli import main

sys.exit(main(["explain", *sys.argv[1:]]))
