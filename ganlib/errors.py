"""User-facing errors: one line saying what is wrong and what to do, exit code 2."""

from __future__ import annotations

import functools
import os
import sys

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A mistake in the user's input (names, sizes, files). Printed as one line, never a traceback."""


BROKEN_PIPE_EXIT_CODE = 141  # what a shell reports for a process killed by SIGPIPE (128 + 13)


def exit_on_user_error(main):
    """Decorate a CLI entry point so a UserError prints `error: ...` on stderr and exits with code 2,
    and a reader that closed the pipe early (`bench show | head`) ends it quietly."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None
        except BrokenPipeError:
            # Python flushes stdout again at exit and would print a second error: point it at devnull
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(BROKEN_PIPE_EXIT_CODE) from None

    return wrapper
