"""Merge-actor memory against the number of models, with a load-everything baseline.

    python benchmarks/merge_memory.py [--models 2 4 8] [--layers 4] [--hidden 512]

For K = 2, 4, 8 copies of one random Llama, merges with recall_ray's merge actors (one
actor) and, as the baseline measured in the same run, with a naive merge that loads every
model's state dict and sums (in a fresh subprocess). Prints and saves
benchmarks/results/merge_memory.json: peak RSS of each, the model size, and the ratio.
The actor's RSS includes the pages of the input files it touched through mmap (shared,
reclaimable page cache), so it grows with the bytes read, not with K held at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
HERE = Path(__file__).resolve().parent

NAIVE = r"""
import sys, torch
from safetensors.torch import load_file
dirs = sys.argv[1:]
states = [load_file(f"{d}/model.safetensors") for d in dirs]
w = 1.0 / len(states)
merged = {k: sum(w * s[k].float() for s in states) for k in states[0]}
print([int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0])
"""


def make_models(root: Path, k: int, layers: int, hidden: int) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    dirs = []
    for i in range(k):
        d = root / f"m{i}"
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(d)
        dirs.append(d)
    return dirs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()

    import ray

    from recall_ray.cluster.merge import run_merge
    from recall_ray.core.merge_methods import MergeMethod
    from recall_ray.io.models import resolve_model
    from recall_ray.validate import check_models

    ray.init(address="local", num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False,
             log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        all_dirs = make_models(Path(tmp), max(args.models), args.layers, args.hidden)
        size_mb = sum(f.stat().st_size for f in all_dirs[0].glob("*.safetensors")) / 2**20
        for k in args.models:
            dirs = all_dirs[:k]
            models = [resolve_model(f"m{i}", str(d), str(dirs[0])) for i, d in enumerate(dirs)]
            ms = check_models(models)
            w = np.full((ms.grouping.num_groups, k), 1.0 / k)
            t0 = time.perf_counter()
            rep = run_merge(models, ms.grouping, ms.infos, MergeMethod("test", "linear", w), f"{tmp}/out{k}", overwrite=False, num_actors=1,
                            placement="DEFAULT")
            ours_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            naive = subprocess.run([sys.executable, "-c", NAIVE, *map(str, dirs)], capture_output=True, text=True,
                                   check=True)
            naive_s = time.perf_counter() - t0
            naive_mb = float(naive.stdout.strip().splitlines()[-1])
            largest = max(i.nbytes for i in ms.infos.values()) / 2**20
            rows.append({"models": k, "model_mb": round(size_mb, 1), "largest_tensor_mb": round(largest, 1),
                         "actor_peak_rss_mb": round(rep.peak_rss_mb, 1), "actor_peak_anon_mb": round(rep.peak_anon_mb, 1), "naive_peak_rss_mb": round(naive_mb, 1),
                         "ratio_actor_over_naive": round(rep.peak_rss_mb / naive_mb, 3),
                         "ratio_actor_anon_over_naive": round(rep.peak_anon_mb / naive_mb, 3),
                         "actor_seconds": round(ours_s, 2), "naive_seconds": round(naive_s, 2)})
            print(json.dumps(rows[-1]))
    ray.shutdown()
    out = HERE / "results" / "merge_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "driver_peak_rss_mb": [int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0]},
                              indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
