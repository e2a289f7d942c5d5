"""GUI-free parts of the SegMoTE Slicer module: logic, worker thread, segment I/O, first-use dependencies.

The engine package ``segmote_core`` is found either next to these files (the built extension installs it into the
same scripted-modules folder) or, when the module is used straight from a source checkout through "Add module
path", two folders up (``<checkout>/segmote_core``); in that case the checkout is put on ``sys.path`` here.
Importing this package never imports torch and never installs anything.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _makeEngineImportable() -> None:
    if importlib.util.find_spec("segmote_core") is not None:
        return
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(checkout, "segmote_core", "__init__.py")) and checkout not in sys.path:
        sys.path.append(checkout)


_makeEngineImportable()
