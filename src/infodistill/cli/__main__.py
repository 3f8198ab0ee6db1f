"""``python -m infodistill.cli``: the same as the ``infodistill`` command."""

import sys

from infodistill.cli import main

sys.exit(main())
