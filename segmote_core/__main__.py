"""`python -m segmote_core ARGS` is `segmote ARGS`."""

import sys

from .cli.main import main

sys.exit(main())
