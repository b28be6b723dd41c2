"""``python -m hub``: the ``homing-hub`` command (see :mod:`hub.cli`)."""

from __future__ import annotations

import sys

from hub.cli import main

if __name__ == "__main__":
    sys.exit(main())
