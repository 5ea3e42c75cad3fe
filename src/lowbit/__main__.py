"""``python -m lowbit``: the ``lowbit`` command line (lowbit.cli)."""

import sys

from lowbit.cli import main

sys.exit(main())
