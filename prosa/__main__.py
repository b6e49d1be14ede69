"""``python -m prosa <verb> ...``: the same as the ``prosa`` command."""
import sys

from .cli import main

sys.exit(main())
