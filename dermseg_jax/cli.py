"""What every command line of the project shares: one-line errors and a quiet console.

- `run(main)` wraps an absl `main`: a `UserError` (or an `OSError` naming a file) is printed as
  one line and the process exits with status 2, with no traceback unless `--debug`.
- `quiet_console()` keeps third-party records below ERROR (Orbax, TFDS, TensorFlow INFO and
  warnings) and Python warnings off the console; `--verbosity=1` brings them back, and
  `add_log_file(path)` sends everything to a run's log file.
Argparse CLIs (`prepare`, `convert`) call `guard(fn, debug=...)` themselves.
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

from dermseg_jax.errors import UserError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
EXIT_USER_ERROR = 2


def define_debug_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--debug` (show tracebacks of user errors) once per flag set."""
    if "debug" not in flag_values:
        flags.DEFINE_bool(
            "debug", False, "Show the traceback of user errors.", flag_values=flag_values
        )


def define_checkpoint_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines `--workdir`, `--checkpoint` and `--compilation_cache` (evaluate, predict)."""
    from dermseg_jax import compilation_cache

    compilation_cache.define_flag(flag_values)
    flags.DEFINE_string(
        "workdir",
        None,
        "Training workdir or converted model directory.",
        required=True,
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "checkpoint",
        "best",
        "For a training workdir: 'best', 'latest' or a step number.",
        flag_values=flag_values,
    )


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl parsing that also accepts `-` for `_` in flag names (`--thesis-protocol`)."""
    fixed = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("--") and not arg.startswith("---"):
            name, sep, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + sep + value
        fixed.append(arg)
    return flag_values(fixed)


def fail(error: BaseException, *, prog: str | None = None) -> NoReturn:
    """Prints `error` as one line (plus its hint) on stderr and exits with status 2."""
    prefix = f"{prog}: " if prog else ""
    print(f"{prefix}error: {describe(error)}", file=sys.stderr)
    hint = getattr(error, "hint", None)
    if hint:
        print(f"{prefix}hint: {hint}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(EXIT_USER_ERROR)


def describe(error: BaseException) -> str:
    """One line for a user error; an OSError names its file."""
    if (
        isinstance(error, OSError)
        and error.filename is not None
        and not isinstance(error, UserError)
    ):
        return f"{error.filename}: {error.strerror or error}"
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split("\n")[0].split()) if "\n" in text else text


def is_user_error(error: BaseException) -> bool:
    """User errors are ours, absl usage errors, and OS errors that name a file."""
    if isinstance(error, (UserError, app.UsageError)):
        return True
    return isinstance(error, OSError) and getattr(error, "filename", None) is not None


def guard(fn: Callable[[], Any], *, debug: bool = False, prog: str | None = None) -> Any:
    """Runs `fn()`; a user error becomes one line and exit status 2 (re-raised under debug)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - filtered just below
        if debug or not is_user_error(e):
            raise
        fail(e, prog=prog)


def run(
    main: Callable[[Sequence[str]], Any],
    *,
    flags_parser: Callable[[list[str]], list[str]] | None = None,
    flag_values: flags.FlagValues = flags.FLAGS,
) -> None:
    """`absl.app.run(main)` with one-line user errors, `--debug`, and a quiet console."""
    define_debug_flag(flag_values)
    parser = flags_parser or flag_values

    def parse(argv: list[str]) -> list[str]:
        try:
            return parser(argv)
        except flags.Error as e:
            fail(UserError(str(e), hint="--help lists the flags"), prog=_prog(argv))
        except Exception as e:  # noqa: BLE001 - config files and overrides fail here
            if "--debug" in argv:
                raise
            if isinstance(e, (AttributeError, KeyError)):
                e = _override_error(e, argv)
            fail(e, prog=_prog(argv))

    def guarded(argv: Sequence[str]) -> Any:
        quiet_console(int(flag_values["verbosity"].value) if "verbosity" in flag_values else 0)
        return guard(lambda: main(argv), debug=flag_values["debug"].value, prog=_prog(argv))

    try:
        app.run(guarded, flags_parser=parse)
    except SystemExit as e:
        if e.code != EXIT_USER_ERROR:
            raise
        # A user error ends the process now: the interpreter's shutdown would wait for (and
        # print the failures of) Orbax's background threads, thousands of lines after a
        # failed save. The log file handler has flushed every record already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_USER_ERROR)


def _override_error(error: Exception, argv: Sequence[str]) -> UserError:
    """A misspelt `--config.a.b=v` override (ml_collections raises a KeyError or AttributeError
    whose text is a quoted repr): one line naming the flag."""
    text = " ".join(str(error).strip("'\"").replace("\\n", " ").replace("\\'", "'").split())
    field = re.search(r"'([^']+)'", text)
    flag = next(
        (a.split("=")[0] for a in argv if field and a.startswith("--") and field[1] in a),
        "--config",
    )
    return UserError(f"{flag}: no such config field ({text})", hint="--helpfull lists the fields")


def _prog(argv: Sequence[str]) -> str:
    name = os.path.basename(argv[0]) if argv else ""
    return "dermseg_jax" if name in ("", "__main__.py", "-c") else name.removesuffix(".py")


class _ConsoleFilter:
    """Keeps third-party records below ERROR (INFO, deprecation and AutoGraph warnings of
    Orbax, TFDS, TensorFlow) and captured Python warnings off the console."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.name in ("py.warnings", _UNRAISABLE_LOGGER):
            return False
        ours = record.pathname.startswith(_PACKAGE_DIR) or record.pathname.startswith("<")
        return ours or record.levelno >= py_logging.ERROR


def quiet_console(verbosity: int = 0) -> None:
    """Keeps the console to the project's messages unless `verbosity` >= 1."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if verbosity >= 1:
        return
    from absl import logging

    handler = logging.get_absl_handler()
    if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
        handler.addFilter(_ConsoleFilter())
    py_logging.captureWarnings(True)
    sys.unraisablehook = _log_unraisable
    _import_tensorflow_quietly()


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with its C++ start-up lines (absl::InitializeLog, oneDNN) kept off the
    console: TF 2.21 prints them whatever TF_CPP_MIN_LOG_LEVEL says. They are replayed on the
    console only if the import fails."""
    import tempfile

    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


_UNRAISABLE_LOGGER = "py.unraisable"


def _log_unraisable(unraisable: Any) -> None:
    """Background-thread errors Python cannot raise (TensorStore callbacks after a failed
    checkpoint read: 'Event loop is closed') go to the log file, not the console."""
    py_logging.getLogger(_UNRAISABLE_LOGGER).warning(
        "%s: %r",
        unraisable.err_msg or "Exception ignored",
        unraisable.exc_value,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


def add_log_file(path: str | os.PathLike) -> py_logging.Handler:
    """Writes every log record (third-party INFO and warnings included) to `path`."""
    handler = py_logging.FileHandler(os.fspath(path), encoding="utf-8")
    handler.setLevel(py_logging.DEBUG)
    handler.setFormatter(
        py_logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d %(message)s"
        )
    )
    py_logging.getLogger().addHandler(handler)
    return handler
