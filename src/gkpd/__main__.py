"""``python -m gkpd``: the ``gkpd`` command (as ``python -m gkpd.cli``)."""

import sys

from gkpd.cli import main

sys.exit(main())
