"""The one exception type of the export package: a message meant for the user, no traceback."""


class ExportError(RuntimeError):
    """A checkpoint or export that cannot be read, converted or validated; the message says why."""
