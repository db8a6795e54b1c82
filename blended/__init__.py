"""blended: text-driven local image editing with Blended Latent Diffusion (Avrahami et al., SIGGRAPH 2023)."""

from .config import EditConfig
from .editor import Editor
from .masks import EditMasks
from .result import Candidate, EditResult
from .errors import EditCancelled, InputError, ModelLoadError, OutOfMemory
from .models import DEFAULT_MODEL, PRESETS, load_model

__all__ = ["EditConfig", "Editor", "EditResult", "Candidate", "EditMasks", "EditCancelled", "InputError", "ModelLoadError", "OutOfMemory",
           "DEFAULT_MODEL", "PRESETS", "load_model"]
__version__ = "0.1.0"
