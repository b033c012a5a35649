"""A server process's CPU time from /proc, split as the benchmarks need it: its main thread
(the event loop) and the whole process (engine, kernels' pool, torch's threads too)."""
from __future__ import annotations

import os


def cpu_seconds(pid: int | None) -> tuple[float, float]:
    """(main thread, whole process) CPU seconds, user + system; zeros without a pid."""
    if pid is None:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    main = total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:         # a thread that just ended
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick     # utime + stime
        total += seconds
        if int(tid) == pid:
            main += seconds
    return main, total
