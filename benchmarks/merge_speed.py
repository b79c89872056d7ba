"""The merge at the floor: recall-ray's merge of N full bf16 experts against a bare
read-accumulate-write loop and against mergekit, on the same inputs and per-layer weights.

    python benchmarks/merge_speed.py [--n 16 48] [--repeats 3]

The experts are benchmarks/scale.py's (bf16 variants of SmolLM2-135M-Instruct; made if
missing). For each N the three sides alternate, each in a fresh process, `--repeats` times:

  ours      a fresh process that starts local Ray and runs cluster.merge.run_merge (the merge
            stage) with per-layer weights: the whole process's seconds, the stage's seconds
            (run_merge alone) and the fixed cost (the process less the stage: interpreter,
            imports, Ray's start and stop)
  bare      a fresh process that, tensor by tensor, reads every model's copy (safetensors
            safe_open), sums them in float32 with the weights of the tensor's layer group,
            and writes the result in bfloat16 (safetensors save_file at the end)
  mergekit  mergekit-yaml on the mergekit.yaml recall-ray wrote beside its merge (the same
            method and weights; mergekit's own loader and writer)

Outputs are compared, ours against bare: the largest difference in bf16 units in the last
place. Ours adds the weighted differences from the base to the base, the loop adds the
weighted models, and the two float32 sums round differently; we expect gaps of more than
one only where the merged value is far smaller than the inputs (not checked element by
element). Medians and ratios go to
benchmarks/results/merge_speed.json and .md, with each side's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO

RESULTS = REPO / "benchmarks" / "results"

OURS = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
import numpy as np, ray
from recall_ray.cluster.merge import run_merge
from recall_ray.cluster.runtime import ray_runtime
from recall_ray.config import RayConfig
from recall_ray.core.merge_methods import MergeMethod
from recall_ray.mergekit_export import mergekit_file
from recall_ray.io.models import resolve_model
from recall_ray.validate import check_models
dirs = json.loads(sys.argv[2]); out = sys.argv[3]; w = np.load(sys.argv[4])
with ray_runtime(RayConfig(object_store_memory=256 * 1024**2)):
    models = [resolve_model(f"m{i}", d, dirs[0]) for i, d in enumerate(dirs)]
    ms = check_models(models)
    method = MergeMethod("recall", "linear", w)
    t1 = time.perf_counter()
    rep = run_merge(models, ms.grouping, ms.infos, method, out, False, side_dir=dirs[0],
                    extra_files=mergekit_file(method, models, ms))
    stage = time.perf_counter() - t1
print(json.dumps({"stage_s": stage, "process_s": time.perf_counter() - t0, "actor_peak_rss_mb": rep.peak_rss_mb,
                  "driver_peak_rss_mb": [int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0]}))
"""

BARE = r"""
import json, re, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from safetensors import safe_open
from safetensors.torch import save_file
dirs = json.loads(sys.argv[1]); out = sys.argv[2]; w = np.load(sys.argv[3])
files = [safe_open(f"{d}/model.safetensors", "pt") for d in dirs]
def group(name):
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return 0 if name == "model.embed_tokens.weight" else int(m.group(1)) + 1 if m else w.shape[0] - 1
merged = {}
for name in files[0].keys():
    g = group(name)
    acc = None
    for q, f in enumerate(files):
        t = f.get_tensor(name).to(torch.float32) * float(w[g, q])
        acc = t if acc is None else acc.add_(t)
    merged[name] = acc.to(torch.bfloat16)
save_file(merged, f"{out}/model.safetensors", metadata={"format": "pt"})
print(json.dumps({"process_s": time.perf_counter() - t0,
                  "peak_rss_mb": [int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0]}))
"""


def timed(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    info = json.loads(lines[-1]) if lines else {}
    info["peak_rss_mb_time"] = int(proc.stderr.strip().splitlines()[-1]) / 1024  # /usr/bin/time's max RSS
    return wall, info


def main() -> int:
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[16, 48])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from scale import base_bf16, full_experts

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    base = base_bf16()
    rows = []
    for n in args.n:
        dirs = [str(base)] + [str(d) for d in full_experts(n)]
        w = np.random.default_rng(n).dirichlet(np.ones(len(dirs)), size=31)
        with tempfile.TemporaryDirectory(prefix="rr_merge_speed_") as tmp:
            np.save(f"{tmp}/w.npy", w)
            ours, bare, mk = [], [], []
            for r in range(args.repeats):  # alternate the sides, each in a fresh process
                out = f"{tmp}/ours{r}"
                ours.append(timed([sys.executable, "-c", OURS, str(REPO), json.dumps(dirs), out, f"{tmp}/w.npy"]))
                os.makedirs(f"{tmp}/bare{r}")
                bare.append(timed([sys.executable, "-c", BARE, json.dumps(dirs), f"{tmp}/bare{r}", f"{tmp}/w.npy"]))
                mk.append(timed(["mergekit-yaml", f"{out}/mergekit.yaml", f"{tmp}/mk{r}", "--quiet"]))
            agree = _max_ulps(f"{tmp}/ours0", f"{tmp}/bare0")
        med = lambda xs: statistics.median(xs)  # noqa: E731
        row = {"n": n, "ours_stage_s": med([i["stage_s"] for _, i in ours]), "ours_process_s": med([t for t, _ in ours]),
               "bare_process_s": med([t for t, _ in bare]), "mergekit_process_s": med([t for t, _ in mk]),
               "ours_actor_peak_rss_mb": med([i["actor_peak_rss_mb"] for _, i in ours]),
               "ours_driver_peak_rss_mb": med([i["peak_rss_mb_time"] for _, i in ours]),
               "bare_peak_rss_mb": med([i["peak_rss_mb_time"] for _, i in bare]),
               "mergekit_peak_rss_mb": med([i["peak_rss_mb_time"] for _, i in mk]),
               "max_bf16_ulps_ours_vs_bare": agree}
        row["ours_fixed_s"] = row["ours_process_s"] - row["ours_stage_s"]
        row["stage_over_bare"] = row["ours_stage_s"] / row["bare_process_s"]
        row["process_over_mergekit"] = row["ours_process_s"] / row["mergekit_process_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "merge_speed.json").write_text(json.dumps({"repeats": args.repeats, "cpus": os.cpu_count(),
                                                           "rows": rows}, indent=2) + "\n")
    lines = ["| N | ours: merge stage s | ours: whole process s | fixed s | bare loop s | mergekit s |"
             " stage / bare | process / mergekit | peak RSS MB: actor / bare / mergekit | max ulps |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['ours_stage_s']:.1f} | {r['ours_process_s']:.1f} | {r['ours_fixed_s']:.1f} |"
                     f" {r['bare_process_s']:.1f} | {r['mergekit_process_s']:.1f} | {r['stage_over_bare']:.2f} |"
                     f" {r['process_over_mergekit']:.2f} | {r['ours_actor_peak_rss_mb']:.0f} /"
                     f" {r['bare_peak_rss_mb']:.0f} / {r['mergekit_peak_rss_mb']:.0f} | {r['max_bf16_ulps_ours_vs_bare']} |")
    (RESULTS / "merge_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _max_ulps(a: str, b: str) -> int:
    """The largest difference, in bf16 units in the last place, between two merges."""
    import torch
    from safetensors.torch import load_file

    ta = {}
    for f in sorted(Path(a).glob("*.safetensors")):
        ta.update(load_file(f))
    tb = load_file(f"{b}/model.safetensors")
    worst = 0
    for k, v in ta.items():
        x, y = v.view(torch.int16).to(torch.int32), tb[k].view(torch.int16).to(torch.int32)
        worst = max(worst, int((x - y).abs().max()))
    return worst


if __name__ == "__main__":
    sys.exit(main())
