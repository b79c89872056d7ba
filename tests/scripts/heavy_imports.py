"""Run a job as `python jobs/<job>.py ARGS...` would, then print on stdout's last line, as
JSON, its exit status and which of the heavy libraries (torch, Ray, scikit-learn,
transformers) it imported: a refusal must be answered before any of them is.

    python tests/scripts/heavy_imports.py jobs/merge.py --set typo=1
"""

from __future__ import annotations

import json
import runpy
import sys

HEAVY = ("torch", "ray", "sklearn", "transformers")

if __name__ == "__main__":
    script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        rc = 0
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    print(json.dumps({"rc": rc, "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))}))
