"""The one exception type of the export package: a message meant for the user, no traceback."""
from pretrain.errors import UserError


class ExportError(UserError, RuntimeError):
    """A checkpoint or export that cannot be read, converted or validated; the message says why."""
