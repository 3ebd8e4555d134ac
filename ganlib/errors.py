"""User-facing errors: one line saying what is wrong and what to do, exit code 2."""

from __future__ import annotations

import functools
import sys

USER_ERROR_EXIT_CODE = 2


class UserError(ValueError):
    """A mistake in the user's input (names, sizes, files). Printed as one line, never a traceback."""


def exit_on_user_error(main):
    """Decorate a CLI entry point so a UserError prints `error: ...` on stderr and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT_CODE) from None

    return wrapper
