"""blended: text-driven local image editing with Blended Latent Diffusion (Avrahami et al., SIGGRAPH 2023)."""

from .config import EditConfig
from .editor import Candidate, EditResult, Editor
from .errors import EditCancelled, InputError, ModelLoadError, OutOfMemory
from .models import DEFAULT_MODEL, PRESETS, load_model

__all__ = ["EditConfig", "Editor", "EditResult", "Candidate", "EditCancelled", "InputError", "ModelLoadError", "OutOfMemory",
           "DEFAULT_MODEL", "PRESETS", "load_model"]
__version__ = "0.1.0"
