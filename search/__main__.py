"""``python -m search --config configs/search_X.yaml --run RUN_DIR [--export ...]``."""

import sys

from search.run import main

sys.exit(main())
