"""The errors a user can cause, and the one exit wrapper every script uses (a leaf module: imports nothing of ours).

Every user-fixable problem is a ``UserError`` (or a subclass: ``CheckpointError``, ``DataError``, ``SamplingError``,
``EvalError`` ...) whose message is one sentence saying what to do.  ``run_cli(main)`` turns it into one line on
stderr and exit status 1; ``Preempted`` (a checkpoint was saved, then SIGTERM/SIGINT stopped the run) into 143;
Ctrl-C into 130.  Set ``VIAR_TRACEBACK=1`` to see the full traceback instead.  A script's ``main(args)`` that ends
the process on an error uses ``run_cli_or_exit``; a ``main(argv) -> status`` that parses its own command line,
``run_cli_parsed``.
"""
import os
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = ['UserError', 'Preempted', 'EXIT_PREEMPTED', 'one_line', 'run_cli', 'run_cli_or_exit', 'run_cli_parsed']

EXIT_PREEMPTED = 143        # the exit status after a signal stopped a run that saved its checkpoint first
INTERRUPTED = 'interrupted; what was written so far is kept'        # run_cli's default Ctrl-C line


class UserError(Exception):
    """A problem the user can fix; printed as one line.  ``every_rank``: under torchrun, the error is this rank's own
    (e.g. one bad image) and is printed by it; otherwise rank 0 alone reports it (all ranks see the same)."""

    def __init__(self, message: str = '', every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class Preempted(Exception):
    """SIGTERM / SIGINT: a checkpoint was saved, the run stops."""


def one_line(e: BaseException) -> str:
    """The user-facing sentence of an error, also when a DataLoader worker re-raised it with its traceback."""
    msg = str(e).strip()
    if 'Original Traceback' in msg:
        msg = msg.splitlines()[-1]
        msg = msg.split('Error: ', 1)[-1] if 'Error: ' in msg else msg
    return ' '.join(msg.split()) or type(e).__name__


def _reports(e: BaseException) -> bool:
    return os.environ.get('RANK', '0') == '0' or getattr(e, 'every_rank', False)


def run_cli(main: Callable[[], Optional[int]], prog: Optional[str] = None, interrupted: str = INTERRUPTED) -> int:
    """Runs ``main()`` and returns the process exit status: 0 (or main's own), 1 for a ``UserError``, 143 for
    ``Preempted``, 130 for Ctrl-C.  With ``VIAR_TRACEBACK=1`` errors propagate with their traceback."""
    prog = prog or os.path.basename(sys.argv[0] or 'viar')
    if os.environ.get('VIAR_TRACEBACK', '').strip() not in ('', '0'):
        rc = main()
        return 0 if rc is None else int(rc)
    try:
        rc = main()
        return 0 if rc is None else int(rc)
    except Preempted as e:
        print(f'[{prog}] stopped: {one_line(e)}', flush=True)
        return EXIT_PREEMPTED
    except UserError as e:
        if _reports(e):
            print(f'{prog}: error: {one_line(e)}', file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f'{prog}: {interrupted}', file=sys.stderr, flush=True)
        return 130


def run_cli_or_exit(main: Callable[[], Optional[int]], prog: Optional[str] = None,
                    interrupted: str = INTERRUPTED) -> None:
    """``run_cli(main, prog, interrupted)``; returns when it ended with status 0, else ends the process with it."""
    rc = run_cli(main, prog, interrupted)
    if rc:
        raise SystemExit(rc)


def run_cli_parsed(main: Callable[[Any], Any], get_parser: Callable[[], Any], argv: Optional[Sequence[str]],
                   prog: Optional[str] = None, interrupted: str = INTERRUPTED) -> int:
    """The exit status (``run_cli``) of ``main(get_parser().parse_args(argv))``, whatever ``main`` returns (its
    result is for callers in Python).  The command line is parsed inside: a bad flag ends with argparse's usage
    message and status 2."""
    def go():
        main(get_parser().parse_args(argv))
    return run_cli(go, prog, interrupted)
