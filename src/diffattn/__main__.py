"""``python -m diffattn ...`` (and ``torchrun ... -m diffattn train ...``): the ``diffattn`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
