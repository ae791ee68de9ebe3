"""``python -m pocket up|status``."""

import sys

from .cli import main

sys.exit(main())
