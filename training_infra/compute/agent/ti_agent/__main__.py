"""`python3 -m ti_agent` (the zipapp has its own __main__.py at its root)."""

import sys

from .agent import main

sys.exit(main())
