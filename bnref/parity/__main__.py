"""``python -m bnref.parity``: runs :func:`bnref.parity.cli.main`."""

import sys

from bnref.parity.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
