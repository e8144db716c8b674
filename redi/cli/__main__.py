"""``python -m redi.cli``: the ``redi`` command."""

import sys

from redi.cli.main import main

sys.exit(main())
