"""`python -m vmworker`: the entry point the supervisor's spawner runs."""

import sys

from .main import main

sys.exit(main())
