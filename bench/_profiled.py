"""Run a command-line entry point under cProfile, timing CPU rather than wall time.

    python bench/_profiled.py OUT.prof concur serve --upstream ...
    python bench/_profiled.py OUT.prof bench/_bare_proxy.py --upstream ...

``python -m cProfile`` times functions by the wall clock, so on a shared machine
every moment the process spends descheduled is billed to whatever function was
running. This wrapper uses the process CPU clock instead, and writes the stats
when the program exits (``concur serve`` exits cleanly on SIGTERM).
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out, target, *rest = sys.argv[1:]
    profiler = cProfile.Profile(time.process_time)
    code = 0
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
