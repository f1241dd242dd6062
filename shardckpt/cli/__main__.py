"""``python -m shardckpt.cli``: the same as the ``shardckpt`` console script."""

import sys

from shardckpt.cli import main

sys.exit(main())
