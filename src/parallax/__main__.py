"""``python -m parallax ...`` (also ``torchrun ... -m parallax generate ...``): the CLI."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
