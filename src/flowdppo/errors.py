"""User-facing errors: every failure the command line reports is one line that names the input.

:func:`one_line` turns an exception into that line (the type of failure, the file or key it concerns,
and what would be valid); ``flowdppo --debug ...`` prints the traceback as well.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem with something the user supplied (a file, a value, a command); the message says which."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what schedulers send before a kill), raised in the main thread like Ctrl-C's KeyboardInterrupt."""


_OS_HINTS = {
    errno.ENOSPC: "No space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
}


def os_reason(e: OSError) -> str:
    """What went wrong, without the path: ``No space left on device``, ``read-only file system``, ..."""
    return _OS_HINTS.get(e.errno or -1, e.strerror or str(e))


def os_error_line(e: OSError) -> str:
    """``cannot write PATH: No space left on device`` style text for an ``OSError``."""
    what = _OS_HINTS.get(e.errno or -1, e.strerror or str(e))
    path = e.filename if e.filename is not None else None
    if path is None:
        return f"{what} ({e})" if str(e) and what not in str(e) else what
    return f"{path}: {what}"


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (newlines folded, Python type named only where nothing else is known)."""
    import yaml

    if isinstance(e, yaml.YAMLError):
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        where = ""
        if mark is not None:
            name = mark.name if mark.name and not mark.name.startswith("<") else "YAML"
            where = f"{name}:{mark.line + 1}:{mark.column + 1}: "
        text = f"{where}not valid YAML ({problem})"
    elif isinstance(e, UnicodeDecodeError):
        text = f"not a text file ({e.reason} at byte {e.start})"
    elif isinstance(e, OSError) and e.errno is not None:
        text = os_error_line(e)
    elif isinstance(e, (UserError, ValueError, FileNotFoundError)) or type(e).__name__ == "ConfigError":
        text = str(e) or type(e).__name__
    else:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    text = " ".join(str(text).split())
    return text if len(text) <= 600 else text[:597] + "..."


class NonFiniteError(RuntimeError):
    """A reward, loss, gradient norm or weight is NaN or infinite; the iteration stopped before the optimizer
    step (or the write) and the message names the value."""
