"""One exception tree for the whole toolchain.

`UserError` and its children are problems the user can fix (a path, a config, a missing package);
their messages say what was expected, what was found and how to fix it. The CLI prints them without
a traceback. Anything else escaping the library is a bug.
"""


class DilateQuantError(Exception):
    """Base of every error raised on purpose by dilatequant."""


class UserError(DilateQuantError):
    """Bad input that the user can fix; the message names the fix."""


class ModelLoadError(UserError):
    """A model given by name or path cannot be found or read."""


class MissingDependencyError(UserError):
    """An optional package needed by a feature is not installed."""

    def __init__(self, feature: str, package: str, extra: str) -> None:
        super().__init__(
            f"{feature} needs the package '{package}', which is not installed. "
            f"Install it with: pip install 'dilatequant[{extra}]'"
        )
