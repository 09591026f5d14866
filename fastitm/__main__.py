"""``python -m fastitm`` is the ``fastitm`` command."""

import sys

from .cli import main

sys.exit(main())
