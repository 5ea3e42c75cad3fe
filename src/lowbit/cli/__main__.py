"""``python -m lowbit.cli``: the ``lowbit`` command line (same as ``python -m lowbit``)."""

import sys

from lowbit.cli import main

sys.exit(main())
