"""Errors a user causes: the command-line tools print them as one line naming the key or file, no traceback."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Something the user gave us cannot work (a config value, a path, a file's content)."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the config key and what it expects."""


class MissingPathError(ConfigError, FileNotFoundError):
    """A path in the config (shards, tokenizer, checkpoint, weights) that does not exist."""


class DataError(UserError, RuntimeError):
    """The data cannot feed a run (a source whose samples are mostly bad, a source with none usable)."""


class UnsafeFileError(UserError, ValueError):
    """A file that would run code if it were loaded (a pickled object where only data belongs): refused
    before anything in it is executed."""


@contextmanager
def one_line_errors(prog: str):
    """Run a command-line tool's body: a ``UserError`` becomes one line on stderr and exit status 2.
    Names read from files (a tar member's, not in UTF-8) are printed with escapes, never a crash."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        yield
    except UserError as exn:
        lines = str(exn).strip().splitlines()
        if "Original Traceback (most recent call last):" in lines:  # raised in a DataLoader worker: torch
            lines = lines[-1:]  # re-raises it with the worker's traceback before the message, on its last line
            lines[0] = lines[0].split(": ", 1)[-1]
        text = " ".join(line.strip() for line in lines)
        kind = "config error" if isinstance(exn, ConfigError) else "error"
        sys.stderr.write(f"{prog}: {kind}: {text}\n")
        sys.exit(2)
    except OSError as exn:
        if not exn.filename:  # not about a path the user gave: a bug, with its traceback
            raise
        # a path typed wrong (under a file, a folder where a file goes, missing), no permission, disk full
        sys.stderr.write(f"{prog}: error: {exn.strerror or exn}: '{exn.filename}'\n")
        sys.exit(2)
