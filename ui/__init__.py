"""The gradio app: `create_demo(editor)` builds the Blocks around an engine it is given (gradio lives only here)."""

from .demo import create_demo, is_demo_model, load_examples
from .limits import Limits

__all__ = ["create_demo", "is_demo_model", "load_examples", "Limits"]
