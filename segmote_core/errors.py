"""User-facing errors: each carries one line that the CLI and the Slicer panel show as is."""


class SegMoTEError(Exception):
    """A problem with the user's input or environment, explained in one line (no traceback shown)."""


class InputError(SegMoTEError):
    """Bad image, prompt, file or argument."""


class CheckpointError(SegMoTEError):
    """A checkpoint or adapter that is missing, corrupt, unsafe or for another architecture."""


class DeviceError(SegMoTEError):
    """A compute device that was asked for but is not available."""


class Cancelled(SegMoTEError):
    """The user cancelled a long operation; nothing was written."""


class TrainingError(SegMoTEError):
    """Training had to stop (non-finite loss, unusable resume state); the message says where and why."""
