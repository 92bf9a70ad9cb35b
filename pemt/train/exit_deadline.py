"""A job's processes end once its run has ended.

After the last save, a rank still has to tear down its process group, its data workers and
the interpreter. Any of these can wait forever on something that will never come (a peer's
socket, a thread that does not end), and a rank that never exits holds its node, and on
Slurm the whole allocation, until the time limit. So once the run is over, the process
gets a deadline: past it, the stack of every thread goes to the job's log (what it was
waiting on) and the process exits with status 1. The checkpoints and the result are
already written by then. faulthandler's watchdog is a C thread: it fires even where Python
threads no longer run (late in interpreter shutdown, inside a C++ destructor).
"""

from __future__ import annotations

import faulthandler
import sys

EXIT_GRACE_S = 120.0  # teardown takes seconds; a result pickled to a slow shared disk included


def arm(seconds: float = EXIT_GRACE_S) -> None:
    """From now, this process has `seconds` to exit by itself."""
    stream = sys.__stderr__ or sys.stderr
    stream.flush()
    faulthandler.dump_traceback_later(seconds, exit=True, file=stream)
