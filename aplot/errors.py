"""The one exception type for user mistakes: the pipelines print it as a single line and exit 2."""


class UserError(ValueError):
    """A recipe, data or path problem the user can fix; its message names what and where."""
