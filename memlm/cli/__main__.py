"""``python -m memlm.cli`` (what torchrun launches): the ``memlm`` command."""

import sys

from memlm.cli import main

sys.exit(main())
