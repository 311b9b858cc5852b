"""``python -m bnref.experiments``: runs :func:`bnref.experiments.cli.main`."""

import sys

from bnref.experiments.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
