"""``python -m app``: the same as the ``duplex`` command."""

import sys

from app.cli import main

sys.exit(main())
