"""Run a command-line entry point under cProfile, timing CPU rather than wall time.

    python bench/_profiled.py OUT.prof concur serve --upstream ...
    python bench/_profiled.py OUT.prof bench/_bare_proxy.py --upstream ...

``python -m cProfile`` times functions by the wall clock, so on a shared machine
every moment the process spends descheduled is billed to whatever function was
running. This wrapper uses the process CPU clock instead, and writes the stats
when the program exits (``concur serve`` exits cleanly on SIGTERM). With
``PROFILE_ON_SIGNAL=1`` in the environment it records only between SIGUSR1 (start)
and SIGUSR2 (stop), so start-up does not drown the request path.
"""

from __future__ import annotations

import cProfile
import os
import runpy
import signal
import sys
import time
from typing import Any


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out, target, *rest = sys.argv[1:]
    profiler = cProfile.Profile(time.process_time)
    code = 0
    if os.environ.get("PROFILE_ON_SIGNAL"):

        def start(*_: Any) -> None:
            profiler.enable()

        def stop(*_: Any) -> None:
            profiler.disable()

        signal.signal(signal.SIGUSR1, start)
        signal.signal(signal.SIGUSR2, stop)
    else:
        profiler.enable()
    try:
        if target == "concur":
            from concur.cli import main as concur_main

            code = concur_main(rest)
        else:
            sys.argv = [target, *rest]
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        profiler.disable()
        profiler.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
