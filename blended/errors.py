"""Exceptions whose message is meant for the person using the tool."""


class InputError(ValueError):
    """Bad user input (image, mask, prompt or setting); the message says what is wrong and what is allowed."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line naming the model and the reason."""


class EditCancelled(RuntimeError):
    """The edit was stopped by its caller (between two denoising steps)."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory during an edit; the message says what to lower."""
