"""``python -m bnref.diagnose``: :func:`bnref.diagnose.cli.main`."""

import sys

from bnref.diagnose.cli import main

sys.exit(main(sys.argv[1:]))
