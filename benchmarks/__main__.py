"""``python -m benchmarks [MODULE ...]``: run benchmark pairs and write docs/benchmarks.md."""

import sys

from ._runner import main

sys.exit(main())
