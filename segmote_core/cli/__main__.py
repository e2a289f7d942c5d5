"""`python -m segmote_core.cli ARGS` is `segmote ARGS`."""

import sys

from .main import main

sys.exit(main())
