"""``python -m fine_tuning STEP``: see :mod:`fine_tuning.cli`."""

import sys

from fine_tuning.cli import main

if __name__ == "__main__":
    sys.exit(main())
