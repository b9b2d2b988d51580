"""The one exception type for user mistakes: the pipelines print it as a single line and exit 2."""


class UserError(ValueError):
    """A recipe, data or path problem the user can fix; its message names what and where."""


def rerun_command(argv: list[str], flag: str = "") -> str:
    """The command line that reruns this stage as the user would type it (`python -m pipelines.rm ...`),
    with `flag` (`--resume true`) set: its value replaced where the command gives it, else appended."""
    import shlex
    from pathlib import Path

    script = Path(argv[0]) if argv else Path("?")
    words = (["python", "-m", f"{script.parent.name}.{script.stem}"] if script.suffix == ".py"
             else ["python", str(script)]) + list(argv[1:])
    if flag:
        key, value = flag.split()
        at = [i for i, word in enumerate(words) if word == key and i + 1 < len(words)]
        for i in at:
            words[i + 1] = value
        words += [] if at else [key, value]
    return shlex.join(words)


def run_pipeline(main, resume: str | None = None) -> None:
    """Run a pipeline's `main()`: a UserError prints as one line (`error: ...`) and exits 2. Ctrl-C prints
    one line (exit 130, as a shell reports an interrupt): the command that continues a stage that resumes
    (`resume`: the flags that make it resume, "" when a plain rerun does), else the command to rerun."""
    import sys

    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        what = "to continue where it stopped, rerun" if resume is not None else "rerun"
        print(f"\ninterrupted; {what}: {rerun_command(sys.argv, resume or '')}", file=sys.stderr)
        sys.exit(130)
