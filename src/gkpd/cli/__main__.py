"""``python -m gkpd.cli``: the ``gkpd`` command."""

import sys

from gkpd.cli import main

sys.exit(main())
