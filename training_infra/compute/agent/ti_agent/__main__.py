"""`python3 -m ti_agent` (the packed folder has its own __main__.py at its root: `python3 -I <folder>`)."""

import sys

from .agent import main

sys.exit(main())
