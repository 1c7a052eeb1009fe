"""The one error type for user mistakes: caught by the CLI, printed as one line, exit code 2."""


class AtomlabError(Exception):
    """A problem the user can fix (bad recipe, bad input file, corrupt checkpoint...)."""
