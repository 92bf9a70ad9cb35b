"""Echo rank 0's output of running jobs to the launching terminal.

submitit writes each task's stdout and stderr to files in the job folder. While the launcher
waits for the jobs, this thread follows rank 0's files, so a user sees the log lines and the
progress bar as if training ran in the foreground.

It writes to the terminal's file descriptor directly, a pipe-buffer's worth at a time and only
when there is room: launched with its output piped to a reader that stopped reading, the relay
drops the echo instead of blocking (the logs stay in the job folder), and never holds a lock that
the rest of the launcher, or its Ctrl-C handler, would wait on.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

from pemt.secrets import redact

PIPE_CHUNK = 4096  # a pipe that select() calls writable takes at least this much without blocking


class LogRelay(threading.Thread):
    def __init__(self, submitit_folder: str, out: TextIO = sys.stderr, poll_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="pemt-log-relay")
        # "<sweep>/.submitit/%j" -> every job's folder under "<sweep>/.submitit"
        self.root = Path(submitit_folder.split("%j")[0])
        self.out = out
        self.poll_s = poll_s
        self.started_at = time.time()
        self._offsets: dict[Path, int] = {}
        self._halt = threading.Event()

    def _rank0_logs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        logs = [p for p in self.root.glob("*/*_0_log.*") if p.suffix in (".out", ".err")]
        return sorted(p for p in logs if p.stat().st_mtime >= self.started_at - 1)

    def _pump(self) -> None:
        logs = self._rank0_logs()
        jobs = sorted({p.parent.name for p in logs})
        for path in logs:
            offset = self._offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            if not chunk:
                continue
            if len(jobs) > 1:
                # Several jobs: whole lines only, each tagged with its job, progress bars dropped.
                end = chunk.rfind(b"\n") + 1
                chunk, text = chunk[:end], chunk[:end].decode(errors="replace")
                lines = [seg.split("\r")[-1] for seg in text.splitlines()]
                self._write("".join(f"[{path.parent.name}] {line}\n" for line in lines if line.strip()))
            else:
                self._write(chunk.decode(errors="replace"))
            self._offsets[path] = offset + len(chunk)

    def _write(self, text: str) -> None:
        text = redact(text)  # what a job printed outside its logging, too, shows no credential
        try:
            fd = self.out.fileno()
        except (AttributeError, OSError, ValueError):  # not a file (a test's buffer): write as usual
            self.out.write(text)
            return
        data = text.encode()
        for start in range(0, len(data), PIPE_CHUNK):
            _, writable, _ = select.select([], [fd], [], self.poll_s)
            if not writable:
                return  # nobody reads: drop the echo rather than block
            os.write(fd, data[start : start + PIPE_CHUNK])

    def run(self) -> None:
        while not self._halt.wait(self.poll_s):
            self._pump()
        self._pump()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
