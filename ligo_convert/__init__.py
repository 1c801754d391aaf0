"""ligo-convert: grow a small pretrained transformer into a larger one with LiGO, in your family's own files.

``from ligo_convert import load, save, grow, export_onnx`` (``export_hub`` for a folder runtimes load) covers the whole flow; the CLI only parses and prints.
"""

__version__ = "0.1.0"

from .canonical import CanonicalModel, describe, from_tensors, load, save  # noqa: E402
from .errors import LigoError  # noqa: E402
from .model import forward, init_weights  # noqa: E402
from .spec import Spec, spaces  # noqa: E402
from .grow import grow  # noqa: E402  (the function; it shadows the submodule's name on purpose)

__all__ = ["CanonicalModel", "LigoError", "Spec", "describe", "export_hub", "export_onnx", "forward", "from_tensors", "grow",
           "init_weights", "load", "save", "spaces", "__version__"]


def __getattr__(name):
    # export pulls in heavier modules (onnx, onnxscript): import them on first use only
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    if name == "export_hub":
        from .layout import export_hub

        return export_hub
    raise AttributeError(f"module 'ligo_convert' has no attribute {name!r}")
