"""``python -m edge_node.worker``: run one model worker process."""

import sys

from .process import main

sys.exit(main())
