"""``python -m concur``: the same as the ``concur`` command."""

import sys

from concur.cli import main

if __name__ == "__main__":
    sys.exit(main())
