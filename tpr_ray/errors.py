"""Exception types that name what is wrong and how to fix it."""


class TprRayError(Exception):
    """Base class for errors raised by tpr-ray."""


class DataError(TprRayError):
    """A dataset, manifest or embedding table is malformed.

    The message names the file, the entry (index or id) and the field.
    """

    def __init__(self, message: str, *, file: str | None = None, entry=None, field: str | None = None):
        self.file = file
        self.entry = entry
        self.field = field
        where = []
        if file is not None:
            where.append(f"file {file}")
        if entry is not None:
            where.append(f"entry {entry}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(TprRayError):
    """A configuration, option or checkpoint does not make sense."""
