"""Exceptions raised by the engine. Each is a clear, one-line message meant for a user."""


class InternVLError(Exception):
    """Base class: anything the engine refuses or cannot do."""


class ModelDirError(InternVLError):
    """The model directory is missing, incomplete or malformed."""


class ConfigError(InternVLError):
    """A configuration value (config.json, the manifest, an export or engine option) has the wrong
    type or range."""


class InvalidRequestError(InternVLError):
    """The request itself is unusable (e.g. an empty question)."""


class ImageError(InternVLError):
    """An image cannot be read or decoded."""


class VideoError(InternVLError):
    """A video cannot be opened or has no frames."""


class PromptTooLongError(InternVLError):
    """The prompt has more tokens than the compiled/exported model accepts."""


class BackendError(InternVLError):
    """The inference backend failed to load or run a model."""


class ServerUnreachableError(InternVLError):
    """The answering server did not answer: down, refusing connections, or past the timeout."""


class ServerError(InternVLError):
    """The answering server answered with an error (its HTTP status and message)."""
