"""The errors a user can cause, and the one exit wrapper every script uses (a leaf module: imports nothing of ours).

Every user-fixable problem is a ``UserError`` (or a subclass: ``CheckpointError``, ``DataError``, ``SamplingError``,
``EvalError`` ...) whose message is one sentence saying what to do.  Every script has the same entry point::

    def main(argv=None) -> int:
        return run_cli(lambda: work(get_parser().parse_args(argv)), PROG)

    if __name__ == '__main__':
        raise SystemExit(main())

``run_cli`` turns a ``UserError`` into one line on stderr and status 1, ``Preempted`` (a checkpoint was saved, then
SIGTERM/SIGINT stopped the run) into 143, Ctrl-C into 130.  ``VIAR_TRACEBACK=1`` shows the full traceback instead.
"""
import os
import sys
from typing import Any, Callable, Optional

__all__ = ['UserError', 'Preempted', 'EXIT_PREEMPTED', 'one_line', 'run_cli']

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


def _status(result: Any) -> int:
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_cli(work: Callable[[], Any], prog: Optional[str] = None, interrupted: str = INTERRUPTED) -> int:
    """Runs ``work()`` and returns the process exit status: ``work``'s own if it returns an int (other results, kept
    for callers in Python, mean 0), 1 for a ``UserError``, 143 for ``Preempted``, 130 for Ctrl-C.  With
    ``VIAR_TRACEBACK=1`` errors propagate with their traceback (the chain of causes included)."""
    prog = prog or os.path.basename(sys.argv[0] or 'viar')
    if os.environ.get('VIAR_TRACEBACK', '').strip() not in ('', '0'):
        return _status(work())
    try:
        return _status(work())
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
