"""The one exception type for user mistakes: the pipelines print it as a single line and exit 2."""


class UserError(ValueError):
    """A recipe, data or path problem the user can fix; its message names what and where."""


def run_pipeline(main) -> None:
    """Run a pipeline's `main()`: a UserError prints as one line (`error: ...`) and exits 2."""
    import sys

    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
