"""``python -m appstore store ...``: the AppStore commands without the installer."""

import sys

from .cli import main

sys.exit(main())
