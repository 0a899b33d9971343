"""Tests of `dermseg_jax.cli`: one-line user errors (exit status 2, no traceback unless `--debug`),
dash-tolerant flags, a quiet console with a complete log file, and no shutdown chatter."""

import os
import subprocess
import sys
import textwrap

from absl import flags

from dermseg_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A CLI in the project's style; its behaviour is chosen by --mode.
SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys, warnings
    from absl import flags
    from absl import logging as absl_logging
    from dermseg_jax import cli
    from dermseg_jax.errors import UserError

    flags.DEFINE_string("mode", "ok", "What main does.")
    flags.DEFINE_string("log", None, "Log file.")

    def main(argv):
        if flags.FLAGS.log:
            cli.add_log_file(flags.FLAGS.log)
        # A record from a file of the package, as the project's modules log.
        exec(compile('absl_logging.info("our message")', cli.__file__, "exec"))
        logging.getLogger("orbax").info("third-party chatter")
        warnings.warn("old API", DeprecationWarning)
        if flags.FLAGS.mode == "user_error":
            # Stands for Orbax's threads, which print at interpreter shutdown.
            atexit.register(lambda: print("Traceback (shutdown chatter)", file=sys.stderr))
            raise UserError("data/x.png: broken", hint="pass --skip_bad")
        if flags.FLAGS.mode == "os_error":
            open("/nonexistent/dir/file.txt")
        if flags.FLAGS.mode == "bug":
            raise RuntimeError("a bug keeps its traceback")
        print("done")

    if __name__ == "__main__":
        cli.run(main, flags_parser=cli.parse_flags)
    """
)


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "tool.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="default")
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_user_error_is_one_line_with_hint_and_exit_2(tmp_path):
    proc = _run(tmp_path, "--mode=user_error")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-2:] == [
        "tool: error: data/x.png: broken",
        "tool: hint: pass --skip_bad",
    ]
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = _run(tmp_path, "--mode=user_error", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "data/x.png: broken" in proc.stderr


def test_os_error_names_its_file(tmp_path):
    proc = _run(tmp_path, "--mode=os_error")
    assert proc.returncode == 2
    assert "tool: error: /nonexistent/dir/file.txt: No such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bugs_keep_their_traceback(tmp_path):
    proc = _run(tmp_path, "--mode=bug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug" in proc.stderr


def test_unknown_flag_is_one_line(tmp_path):
    proc = _run(tmp_path, "--mdoe=ok")
    assert proc.returncode == 2
    assert "tool: error:" in proc.stderr and "mdoe" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_is_quiet_and_the_log_file_has_everything(tmp_path):
    log = tmp_path / "run.log"
    proc = _run(tmp_path, "--mode=ok", f"--log={log}")
    assert proc.returncode == 0, proc.stderr
    assert "our message" in proc.stderr
    assert "third-party chatter" not in proc.stderr and "old API" not in proc.stderr
    text = log.read_text()
    assert "our message" in text and "third-party chatter" in text and "old API" in text
    loud = _run(tmp_path, "--mode=ok", "--verbosity=1")
    assert "third-party chatter" in loud.stderr and "old API" in loud.stderr


def test_parse_flags_accepts_dashes():
    flag_values = flags.FlagValues()
    cli.define_checkpoint_flags(flag_values)
    flags.DEFINE_bool("thesis_protocol", False, "", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", None, "", flag_values=flag_values)
    cli.parse_flags(
        ["prog", "--workdir=/x", "--thesis-protocol", "--batch-size=2", "--checkpoint", "latest"],
        flag_values,
    )
    assert flag_values.thesis_protocol and flag_values.batch_size == 2
    assert flag_values.workdir == "/x" and flag_values.checkpoint == "latest"


def test_describe_names_the_file_of_os_errors():
    error = FileNotFoundError(2, "No such file or directory", "/data/a.jpg")
    assert cli.describe(error) == "/data/a.jpg: No such file or directory"
    assert cli.describe(ValueError("first line\nsecond")) == "first line"
    assert not cli.is_user_error(RuntimeError("bug"))
