"""What a typo costs: the wall time of the job's refusals, from a warm file cache.

    python benchmarks/first_minute.py [--repeat 7]

Runs, each in a fresh process and in turn (so that a passing load spike hits every case
alike), `python jobs/merge.py` with an unknown config key and with a model directory that
does not exist, and, for scale, a process that only imports what a refusal no longer
imports (torch, scikit-learn's KMeans, transformers, Ray). One unrecorded round first warms
the file cache. Prints and saves benchmarks/results/first_minute.json and .md: per case the
median, min and max of the wall time and the median CPU time (user + system), with the
machine's load average while it ran (the CPU is shared: wall time is CPU time stretched by
the load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CASES = {
    "unknown config key (--set typo=1)": ["jobs/merge.py", "--set", "typo=1"],
    "missing model directory (--set base.path=...)": ["jobs/merge.py", "--set", "base.path={tmp}/no_such_model"],
    "for scale: import torch, sklearn.cluster, transformers, ray": [
        "-c", "import torch, sklearn.cluster, transformers, ray"],
}


def run_once(argv: list[str], tmp: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit status) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *[a.format(tmp=tmp) for a in argv]], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    walls: dict[str, list[float]] = {c: [] for c in CASES}
    cpus: dict[str, list[float]] = {c: [] for c in CASES}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, argv in CASES.items():  # warm the file cache; not recorded
            run_once(argv, tmp)
        for _ in range(args.repeat):
            loads.append(os.getloadavg()[0])
            for c, argv in CASES.items():
                wall, cpu, rc = run_once(argv, tmp)
                expected = 0 if argv[0] == "-c" else 2
                if rc != expected:
                    raise SystemExit(f"{c}: exit status {rc}, expected {expected}")
                walls[c].append(wall)
                cpus[c].append(cpu)
    rows = [{"case": c, "wall_median_s": round(statistics.median(walls[c]), 2), "wall_min_s": round(min(walls[c]), 2),
             "wall_max_s": round(max(walls[c]), 2), "cpu_median_s": round(statistics.median(cpus[c]), 2),
             "runs": len(walls[c])} for c in CASES]
    result = {"rows": rows, "load_average_1min": [round(x, 1) for x in loads], "cpus": os.cpu_count(),
              "python": platform.python_version()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "first_minute.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| case | wall median (s) | min | max | CPU median (s) |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['wall_median_s']:.2f} | {r['wall_min_s']:.2f} | {r['wall_max_s']:.2f} |"
              f" {r['cpu_median_s']:.2f} |" for r in rows]
    lines.append(f"\n{args.repeat} runs each, {os.cpu_count()} CPUs, 1-min load average"
                 f" {min(loads):.1f}-{max(loads):.1f} while it ran.")
    (HERE / "results" / "first_minute.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
