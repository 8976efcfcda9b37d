"""``python -m pipelines.cli ...``: the ``mbpo`` command."""

import sys

from . import main

sys.exit(main())
