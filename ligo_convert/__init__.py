"""ligo-convert: grow a small pretrained transformer into a larger one with LiGO, in your family's own files."""

__version__ = "0.1.0"

from .canonical import CanonicalModel, describe, from_tensors, load, save  # noqa: E402
from .errors import LigoError  # noqa: E402
from .model import forward, init_weights  # noqa: E402
from .spec import Spec, spaces  # noqa: E402

__all__ = ["CanonicalModel", "LigoError", "Spec", "describe", "forward", "from_tensors", "init_weights", "load",
           "save", "spaces", "__version__"]
