"""Scale: the RECALL job (jobs/merge.py's code path, run_pipeline) with N experts on a
simulated multi-node cluster (ray.cluster_utils.Cluster: a head with no CPUs and two worker
nodes, merge actors spread over them), for full-model experts (bf16 variants of
SmolLM2-135M-Instruct) and for LoRA experts of it.

    python benchmarks/scale.py --kind full --n 2 8 24 48
    python benchmarks/scale.py --kind lora --n 2 8 24 48
    python benchmarks/scale.py --report           # tables, fits and plots from the saved runs

Each N runs in a fresh process (its driver's peak memory is its own) and saves
benchmarks/results/scale/<kind>-<N>.json: every stage's seconds, the merge actors' and the
driver's peak RSS, the tensor bytes each stage read, where the merge ran. The representation
stages' and the merge's bytes are measured by their readers (the manifest's records); the
NaN/Inf check reads nothing of its own (its tests run inside the representation loads, and
`finite_check` is their summed seconds); the fingerprints read nothing of their own where the
representation loads give them (a new run directory), else two pieces of at most 4 KiB per
tensor (recall_ray.validate.Fingerprints, its count in the manifest's inputs); a LoRA base's
check reads each tensor's first row (counted from the headers). The
total is also given as a multiple of the inputs' tensor bytes (the base and every expert
once); safetensors headers, read by every process that opens a model, are left out. --report
fits each stage's seconds to a + b * N (the per-expert marginal cost b) and writes scale.md,
scale.json and plots. The full-expert runs from before issue 21 (a separate NaN/Inf scan, one
more read of every input) are kept in before-issue-21/ and left out of the report.

Targets (issue 11): merge actor peak memory flat in N (within 10% from 2 to 48); driver peak
under 1 GB at N = 48; cost linear in N; with LoRA experts the merge stage at 48 at most 1.5x
the merge stage at 2, and switching to the next LoRA expert in a representation actor under
0.5 s (measured here on the same adapters: `swap_seconds`). Issue 21: with full experts, the
bytes read at N = 48 at most 2.0x the inputs' size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "scale"
MODELS = Path(os.environ.get("RECALL_RAY_BENCH_MODELS", Path(tempfile.gettempdir()) / "recall_ray_scale_models"))
STAGES = ("finite_check", "reps_new", "typical", "reps_others", "weights", "merge")
BYTE_STAGES = ("preflight", "finite_check", "reps_new", "reps_others", "merge")  # finite_check: runs before issue 21


# ------------------------------------------------------------------------- the experts

def base_bf16() -> Path:
    """SmolLM2-135M-Instruct in bfloat16 (the builtin's float32 weights, rounded once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recall_ray.io.models import resolve_path

    out = MODELS / "base-bf16"
    if (out / "model.safetensors").is_file():
        return out
    src = resolve_path("builtin:smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def full_experts(n: int) -> list[Path]:
    """n bf16 experts: the base plus small seeded noise on every weight (a stand-in for a
    full fine-tune: each expert differs from the base everywhere)."""
    import torch
    from safetensors.torch import load_file, save_file

    base = base_bf16()
    state = None
    out = []
    for i in range(n):
        d = MODELS / f"full-{i:03d}"
        if not (d / "model.safetensors").is_file():
            state = state or load_file(base / "model.safetensors")
            g = torch.Generator().manual_seed(1000 + i)
            noisy = {k: (v.float() + 0.002 * torch.randn(v.shape, generator=g) * v.float().std()).to(v.dtype)
                     for k, v in state.items()}
            d.mkdir(parents=True, exist_ok=True)
            save_file(noisy, d / "model.safetensors", metadata={"format": "pt"})
            for f in base.iterdir():
                if f.suffix != ".safetensors":
                    (d / f.name).write_bytes(f.read_bytes())
        out.append(d)
    return out


def lora_experts(n: int) -> list[Path]:
    """n PEFT LoRA adapters (r 8 on q_proj, v_proj) of the bf16 base, random B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = base_bf16()
    out = []
    model = None
    for i in range(n):
        d = MODELS / f"lora-{i:03d}"
        if not (d / "adapter_model.safetensors").is_file():
            if model is None:
                model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                       LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
            g = torch.Generator().manual_seed(2000 + i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * (0.01 if "lora_B" in name else 0.05))
            model.save_pretrained(d)
        out.append(d)
    return out


# ------------------------------------------------------------------------- one N

def run_one(kind: str, n: int, out: Path) -> dict:
    """The job with n experts (n - 1 old ones and the new model) on a simulated cluster."""
    import pyarrow.parquet as pq
    import ray
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    from recall_ray.cluster.pools import inference_pool, merge_pool
    from recall_ray.cluster.runtime import quiet_ray_data
    from recall_ray.config import build_config
    from recall_ray.pipeline import preflight, run_pipeline
    from recall_ray.procmem import peak_rss_mb

    experts = [MODELS / f"{kind}-{i:03d}" for i in range(n)]  # made by the parent process
    base = MODELS / "base-bf16"
    load_start = os.getloadavg()  # the machine's load: its seconds are comparable only at the same load
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="rr_scale_", dir="/tmp")
    # no dashboard: on a busy machine its start-up can time the cluster's start out, and
    # nothing here uses it
    # Cluster.add_node writes to <default Ray temp dir>/ray_current_cluster whatever temp_dir
    # it is given: on a machine where Ray never ran, that directory must be made first
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": tmp, "include_dashboard": False,
                                                           "object_store_memory": 200 * 1024**2})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    cfg = build_config({
        "run_dir": str(out / "run"),
        "base": {"name": "base", "path": str(base)},
        "experts": [{"name": f"e{i:03d}", "path": str(d)} for i, d in enumerate(experts[:-1])],
        "new_model": {"name": "new", "path": str(experts[-1])},
        "task": {"name": "ag_news", "data": str(REPO / "data" / "ag_news" / "train.jsonl"), "template": "ag_news",
                 "max_samples": 64, "max_length": 128},
        "typical": {"k": 5},
        "representations": {"batch_size": 16},
        "merge": {"num_actors": 2, "placement": "SPREAD"},
        "ray": {"address": cluster.address},
    })
    try:
        ray.init(address=cluster.address)
        quiet_ray_data()
        cluster.wait_for_nodes()
        t_ready = time.perf_counter() - t0
        plan = preflight(cfg)
        result = run_pipeline(cfg, plan)
        driver_peak = peak_rss_mb()
        # the pools the stages had (the same sizing rule, the same cluster): the per-core rates
        pools = {"reps": asdict(inference_pool(ray.cluster_resources(), cfg.representations.num_actors, n)),
                 "merge": asdict(merge_pool(ray.cluster_resources(), cfg.merge.num_actors, plan.modelset.grouping.num_groups))}
        manifest = json.loads((out / "run" / "manifest.json").read_text())
        tokens = _tokens(base, [r["prompt"] + r["target"] for r in plan.records],
                         pq.read_table(out / "run" / "typical.parquet").column("text").to_pylist(), 128)
    finally:
        ray.shutdown()
        cluster.shutdown()
    stages = manifest["stages"]
    merge = stages["merge"]["result"]
    seconds = {name: st.get("seconds", 0.0) for name, st in stages.items()}
    reps_others = sum(v for k, v in seconds.items() if k.startswith("reps_") and k != "reps_new")
    base_bytes = _tensor_bytes(base)
    expert_bytes = [_tensor_bytes(d) for d in experts]
    pool_bytes = [st["result"]["bytes_read"] for k, st in stages.items()
                  if k.startswith("reps_") and "pool_models" in (st.get("result") or {})]
    bytes_read = {
        "preflight": manifest["inputs"]["fingerprint_bytes_read"] + _base_check_bytes(kind, base),
        "reps_new": stages["reps_new"]["result"]["bytes_read"],  # measured by the actors' readers
        "reps_others": sum(sum(b.values()) for b in pool_bytes),
        "merge": sum(s["bytes_read"] for s in merge["shards"]),
    }
    inputs = base_bytes + sum(expert_bytes)
    return {
        "kind": kind, "n": n, "cluster_start_s": t_ready,
        "load_average_1min": {"start": load_start[0], "end": os.getloadavg()[0]},
        "stage_seconds": {**{k: seconds.get(k, 0.0) for k in STAGES if k != "reps_others"},
                          "reps_others": reps_others},
        "merge_actor_peak_rss_mb": max(s["peak_rss_mb"] for s in merge["shards"]),
        "merge_actor_peak_anon_mb": max(s["peak_anon_mb"] for s in merge["shards"]),
        "merge_nodes": sorted({s["node_id"] for s in merge["shards"]}),
        "driver_peak_rss_mb": driver_peak,
        "finite_check_in_loads": True,  # finite_check's seconds: the tests inside the representation loads
        "bytes_read": bytes_read,
        "inputs_bytes": inputs,
        "read_multiple": {**{k: v / inputs for k, v in bytes_read.items()}, "total": sum(bytes_read.values()) / inputs},
        "model_bytes": {"base": base_bytes, "expert": expert_bytes[0]},
        "typical_count": result.typical_count,
        "pools": pools,
        "tokens": tokens,  # what the forward passes processed (docs/scaling.md's per-token rates)
    }


def _tokens(model_dir: Path, task_texts: list[str], typical_texts: list[str], max_length: int) -> dict:
    """Tokens through the representation forwards: every task sample once (reps_new), the
    typical samples once per other model (reps_others), as the extractor truncates them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    count = lambda texts: sum(len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"])  # noqa: E731
    return {"reps_new": count(task_texts), "typical_per_model": count(typical_texts)}


def _tensor_bytes(model_dir: Path) -> int:
    """The tensor data of a model's (or an adapter's) safetensors files."""
    from recall_ray.io.safetensors_io import tensor_infos

    return sum(i.nbytes for i in tensor_infos(sorted(Path(model_dir).glob("*.safetensors"))).values())


def _base_check_bytes(kind: str, base: Path) -> int:
    """Tensor bytes preflight reads to check that LoRA experts fit their base
    (recall_ray.validate.check_models: the base's content fingerprint, each tensor's first
    row, once per base); none for full experts."""
    if kind == "full":
        return 0
    from recall_ray.io.safetensors_io import tensor_infos

    return sum(i.nbytes // i.shape[0] if i.shape and i.shape[0] else i.nbytes
               for i in tensor_infos(sorted(base.glob("*.safetensors"))).values())


def swap_seconds(base: Path, adapters: list[Path]) -> float:
    """Median seconds to move a representation actor's model to the next LoRA expert
    (models.LoadedModelSlot, as the actors do), after the first load."""
    import statistics

    import torch

    from recall_ray.io.models import LoadedModelSlot, resolve_model

    models = [resolve_model(f"a{i}", str(a), str(base)) for i, a in enumerate(adapters)]
    slot = LoadedModelSlot(models, torch.float32, "cpu", padding_side="right")
    slot.get(0)
    times = []
    for i in range(1, len(models)):
        t0 = time.perf_counter()
        slot.get(i)
        times.append(time.perf_counter() - t0)
    assert slot.swaps == len(models) - 1
    return statistics.median(times)


# ------------------------------------------------------------------------- report

def report() -> int:
    import numpy as np

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*-*.json")) if p.stem.split("-")[-1].isdigit()]
    swap = json.loads((RESULTS / "lora-swap.json").read_text())["swap_seconds"] if (RESULTS / "lora-swap.json").is_file() \
        else None
    out = {"fits": {}, "runs": runs}
    lines = []
    for kind in ("full", "lora"):
        rs = sorted([r for r in runs if r["kind"] == kind], key=lambda r: r["n"])
        if not rs:
            continue
        ns = np.array([r["n"] for r in rs], dtype=float)
        lines += [f"### {kind} experts", "", "| N | " + " | ".join(STAGES) + " | merge actor peak RSS MB |"
                  " driver peak RSS MB | merge bytes read (GB) |", "|" + "---:|" * (len(STAGES) + 4)]
        for r in rs:
            lines.append(f"| {r['n']} | " + " | ".join(f"{r['stage_seconds'][s]:.1f}" for s in STAGES)
                         + f" | {r['merge_actor_peak_rss_mb']:.0f} | {r['driver_peak_rss_mb']:.0f}"
                         f" | {r['bytes_read']['merge'] / 1e9:.2f} |")
        if any(r.get("finite_check_in_loads") for r in rs):
            lines += ["", "finite_check: the NaN/Inf tests inside the representation loads (seconds summed over"
                      " the actors, part of reps_new and reps_others), not a stage of its own"]
        lines += ["", "bytes read, as a multiple of the inputs' tensor bytes (the base and every expert once):", "",
                  "| N | inputs GB | " + " | ".join(BYTE_STAGES) + " | total |", "|" + "---:|" * (len(BYTE_STAGES) + 3)]
        for r in rs:
            inputs, got = _inputs_bytes(r), r["bytes_read"]
            lines.append(f"| {r['n']} | {inputs / 1e9:.2f} | "
                         + " | ".join(f"{got[s] / inputs:.3f}" if s in got else "-" for s in BYTE_STAGES)
                         + f" | {sum(got.values()) / inputs:.3f} |")
        fits = {}
        for s in STAGES:
            y = np.array([r["stage_seconds"][s] for r in rs])
            if len(rs) >= 2:
                b, a = np.polyfit(ns, y, 1)
                resid = y - (a + b * ns)
                r2 = 1 - (resid ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
                fits[s] = {"per_expert_s": float(b), "fixed_s": float(a), "r2": float(r2)}
        out["fits"][kind] = fits
        lines += ["", "| stage | seconds per expert | fixed seconds | R^2 |", "|---|---:|---:|---:|"]
        lines += [f"| {s} | {f['per_expert_s']:.3f} | {f['fixed_s']:.1f} | {f['r2']:.3f} |" for s, f in fits.items()]
        rss = [r["merge_actor_peak_rss_mb"] for r in rs]
        lines += ["", f"merge actor peak RSS from N={rs[0]['n']} to N={rs[-1]['n']}: {rss[0]:.0f} -> {rss[-1]:.0f} MB"
                  f" ({100 * (rss[-1] / rss[0] - 1):+.1f}%); driver peak at N={rs[-1]['n']}:"
                  f" {rs[-1]['driver_peak_rss_mb']:.0f} MB", ""]
        if kind == "lora":
            m = [r["stage_seconds"]["merge"] for r in rs]
            lines.append(f"LoRA merge stage N={rs[-1]['n']} / N={rs[0]['n']}: {m[-1] / m[0]:.2f}x;"
                         f" switching to the next LoRA expert: {swap if swap is None else round(swap, 3)} s (median)")
            lines.append("")
    (RESULTS / "scale.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    _plots(runs)
    print("\n".join(lines))
    return 0


def _inputs_bytes(r: dict) -> int:
    """The base's and every expert's bytes (a run before issue 21 has only the model sizes)."""
    return r.get("inputs_bytes") or r["model_bytes"]["base"] + r["n"] * r["model_bytes"]["expert"]


def _plots(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for kind in ("full", "lora"):
        rs = sorted([r for r in runs if r["kind"] == kind], key=lambda r: r["n"])
        if not rs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for s in STAGES:
            axes[0].plot([r["n"] for r in rs], [r["stage_seconds"][s] for r in rs], marker="o", label=s)
        axes[0].set(xlabel="experts N", ylabel="seconds", title=f"{kind} experts: stage seconds")
        axes[0].legend(fontsize=7)
        axes[1].plot([r["n"] for r in rs], [r["merge_actor_peak_rss_mb"] for r in rs], marker="o", label="merge actor")
        axes[1].plot([r["n"] for r in rs], [r["driver_peak_rss_mb"] for r in rs], marker="o", label="driver")
        axes[1].set(xlabel="experts N", ylabel="peak RSS (MB)", title="peak memory")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / f"scale-{kind}.png")
        plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["full", "lora"], default="full")
    p.add_argument("--n", type=int, nargs="+", default=[2, 8, 24, 48])
    p.add_argument("--report", action="store_true", help="only tabulate, fit and plot the saved runs")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one N in this process
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # the simulated nodes' workers at the benchmark's own priority, as a local job's run
    # (cluster.runtime): at Ray's default niceness 15 any busy process takes their cores
    os.environ.setdefault("RAY_worker_niceness", "0")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report()
    if args.one is not None:
        with tempfile.TemporaryDirectory(prefix="rr_scale_run_") as tmp:
            rec = run_one(args.kind, args.one, Path(tmp))
        (RESULTS / f"{args.kind}-{args.one}.json").write_text(json.dumps(rec, indent=2) + "\n")
        print(json.dumps(rec))
        return 0
    (full_experts if args.kind == "full" else lora_experts)(max(args.n))  # here, not in the measured drivers
    for n in args.n:  # each N in a fresh process: its own driver peak memory, its own cluster
        subprocess.run([sys.executable, __file__, "--kind", args.kind, "--one", str(n)], check=True)
    if args.kind == "lora":
        swaps = {"swap_seconds": swap_seconds(base_bf16(), lora_experts(8))}
        (RESULTS / "lora-swap.json").write_text(json.dumps(swaps, indent=2) + "\n")
    return report()


if __name__ == "__main__":
    sys.exit(main())
