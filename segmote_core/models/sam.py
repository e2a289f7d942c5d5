"""segment-anything's model parts (ViT encoder, prompt encoder, mask decoder), imported without its package
``__init__``.

That ``__init__`` imports SAM's predictor and mask generator, which import torchvision, which imports torch's
compiler: about 2 s at every start and about 165 MiB of memory for code SegMoTE never runs. So the package is put
into ``sys.modules`` as a module whose ``__init__`` runs only when something first asks it for a name it lacks
(``from segment_anything import SamPredictor`` still works, in the same process, after SegMoTE loaded):
``segment_anything.modeling`` itself imports nothing outside torch and numpy.
"""

from __future__ import annotations

import importlib.util
import sys
import threading


def _package_initialised_on_demand(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    package = importlib.util.module_from_spec(spec)  # __path__ and __spec__ set, __init__ not run
    once = threading.Lock()

    def __getattr__(attribute: str):
        with once:  # the first thread to ask runs the real __init__, which defines the package's names
            if package.__dict__.pop("__getattr__", None) is not None:
                spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = __getattr__
    sys.modules[name] = package


_package_initialised_on_demand("segment_anything")

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer  # noqa: E402
from segment_anything.modeling.common import LayerNorm2d  # noqa: E402
from segment_anything.modeling.image_encoder import Attention as SamAttention, get_rel_pos  # noqa: E402
from segment_anything.modeling.mask_decoder import MLP  # noqa: E402

__all__ = ["ImageEncoderViT", "LayerNorm2d", "MLP", "MaskDecoder", "PromptEncoder", "TwoWayTransformer",
           "SamAttention", "get_rel_pos"]
