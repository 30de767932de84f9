"""``python -m gateway`` is the ``keygate`` command."""

import sys

from .cli import main

sys.exit(main())
