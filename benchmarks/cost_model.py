"""A cost model on paper: RECALL with N = 48 experts of 7B parameters on a cluster of 8 GPU
nodes, built from the rates that benchmarks/scale.py measured on this machine.

    python benchmarks/cost_model.py      # after scale.py --kind full/lora and --report

What is measured here (benchmarks/results/scale/, SmolLM2-135M experts, a simulated 3-node
cluster on 2 cores), each as the marginal cost of one more expert (the slope of the fit, so
start-up costs drop out), except where said:
  - the merge's read-accumulate rate, bytes of input per CPU-second (full experts);
  - the NaN/Inf test's rate, bytes per CPU-second: recall_ray.io.models.has_nonfinite on one
    thread over 256 MB of bf16, the best of 5 (`check_rate`, run here: the scale runs' summed
    test seconds were taken on a busy machine, some with the slower torch.isfinite, and are
    reported beside it);
  - a representation forward's rate, FLOP per CPU-second (LoRA experts: no model load);
  - a model load's rate in a representation actor, bytes per second (full minus LoRA);
  - how many times the stages read each input (full experts, the largest N): the loads of the
    representation stages (reps_new and reps_others together read every model once per actor
    that loads it) and the merge, each as a multiple of the inputs' bytes; the projection's
    bytes per stage are these multiples of the 7B inputs.
What is assumed (the ASSUMED dict below, stated in docs/scaling.md): the 7B model's shape, the
nodes' GPUs, cores, network and the shared storage's bandwidth. Each stage's time is the
largest of its parts (reading, network, compute), since the stages stream; the fixed costs
(Ray start, actor start) are left out and named separately.

Writes benchmarks/results/cost_model.json and .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RESULTS.parents[1]))  # this checkout's recall_ray (for the NaN/Inf test's rate)

# SmolLM2-135M (the measured model): FLOP per token of a representation forward, which skips
# the LM head: 2 x the non-embedding parameters (30 blocks of q 576x576, k and v 576x192,
# o 576x576, MLP 3 x 576x1536) plus attention over 128 tokens (small: 2 x 2 x T x d per block).
MEASURED_FLOP_PER_TOKEN = 2 * 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 2 * 2 * 128 * 576 * 30

ASSUMED = {
    "model": "7B Llama-shaped (Llama-2-7B: 32 blocks, hidden 4096, MLP 11008, vocab 32000)",
    "params": 6.74e9,
    "nonembedding_params": 6.48e9,
    "bytes_per_param": 2,  # bf16 checkpoints
    "lora_bytes": 2 * 32 * 2 * (4096 * 16 + 16 * 4096) * 2,  # r 16 on q, v of 32 blocks, bf16
    "task_samples": 200,
    "typical_samples": 100,  # the union over 32 layers of k = 20 (scale.py's runs: 37-41 of 64 at k 5)
    "tokens_per_sample": 100,  # measured on AG News here (scale.py's token counts): about the same
    "nodes": 8,
    "gpus_per_node": 8,
    "cpus_per_node": 64,
    "gpu_bf16_flops": 990e12,  # H100 SXM dense bf16 peak
    "gpu_utilisation": 0.3,  # short sequences, batch 16: far from peak
    "nic_bytes_per_s": 12.5e9,  # 100 Gb/s per node
    "storage_bytes_per_s": 20e9,  # the shared store's aggregate read rate (a parallel file system)
    "merge_actors_per_node": 8,
}


BEFORE_21 = RESULTS / "scale" / "before-issue-21"  # full-expert runs with the separate NaN/Inf scan


def _load(folder: Path = RESULTS / "scale") -> dict:
    runs = {}
    for p in sorted(folder.glob("*-*.json")):
        stem = p.stem.split("-")
        if stem[-1].isdigit():
            runs[(stem[0], int(stem[-1]))] = json.loads(p.read_text())
    return runs


def _slope(runs: dict, kind: str, what) -> float:
    """Per-expert marginal (d what / d N) between the smallest and the largest N of `kind`."""
    ns = sorted(n for k, n in runs if k == kind)
    lo, hi = runs[(kind, ns[0])], runs[(kind, ns[-1])]
    return (what(hi) - what(lo)) / (ns[-1] - ns[0])


def check_bytes_per_cpu_s(nbytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """The NaN/Inf test's rate on one thread (recall_ray.io.models.has_nonfinite over bf16), the
    best of `repeats`: the least disturbed by other work on the machine."""
    import time

    import torch

    from recall_ray.io.models import has_nonfinite

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = torch.randn(nbytes // 2).to(torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        has_nonfinite(t)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return nbytes / best


def measured_rates(runs: dict, timing_runs: dict | None = None) -> dict:
    """The rates above. `timing_runs`: full-expert runs whose seconds to use for the merge and
    load rates (default `runs`), e.g. runs on a quiet machine from before issue 21, whose merge
    and forward code is unchanged; the NaN/Inf test's rate and the read counts always come
    from `runs`."""
    sec = lambda stage: (lambda r: r["stage_seconds"][stage])  # noqa: E731
    byt = lambda stage: (lambda r: r["bytes_read"][stage])  # noqa: E731
    full48 = runs[("full", max(n for k, n in runs if k == "full"))]
    if timing_runs:  # their full-expert seconds replace those of `runs`
        runs = {**{k: v for k, v in runs.items() if k[0] != "full"}, **timing_runs}
    lora48 = runs[("lora", max(n for k, n in runs if k == "lora"))]
    pools = full48["pools"]  # the same sizing rule on the same simulated cluster for both kinds
    merge_cpus = pools["merge"]["size"] * pools["merge"]["threads"]
    reps_threads = pools["reps"]["size"] * pools["reps"]["threads"]
    merge_s = _slope(runs, "full", sec("merge"))
    merge_b = _slope(runs, "full", byt("merge"))
    # the tests run in the representation actor, on its torch threads, over what its loads read
    tested = full48["bytes_read"]["reps_new"] + full48["bytes_read"]["reps_others"]
    check_s = full48["stage_seconds"]["finite_check"]
    check_rate = check_bytes_per_cpu_s()
    lora_reps_s = _slope(runs, "lora", sec("reps_others"))
    full_reps_s = _slope(runs, "full", sec("reps_others"))
    tokens = (lora48.get("tokens") or full48["tokens"])["typical_per_model"]
    return {
        "merge_bytes_per_cpu_s": merge_b / (merge_s * merge_cpus),
        "check_bytes_per_cpu_s": check_rate,
        "check_bytes_per_cpu_s_in_the_runs": tested / (check_s * pools["reps"]["threads"]),
        "forward_flop_per_cpu_s": tokens * MEASURED_FLOP_PER_TOKEN / (lora_reps_s * reps_threads),
        # a model load is what a full expert costs beyond a LoRA swap; None where noise hides it
        "load_bytes_per_s": (full48["model_bytes"]["expert"] / (full_reps_s - lora_reps_s)
                             if full_reps_s - lora_reps_s > 0.05 else None),
        "per_expert_s": {"merge": merge_s, "reps_others_full": full_reps_s, "reps_others_lora": lora_reps_s},
        "check_seconds_at_largest_n": check_s,
        "largest_n": full48["n"],
        # reads of each input per stage kind, N-free: the representation loads (every model is
        # loaded in reps_new or in reps_others) and the merge, over the inputs' tensor bytes
        "reads_per_input": {"reps": (tested / full48["inputs_bytes"]),
                            "merge": full48["bytes_read"]["merge"] / full48["inputs_bytes"]},
        "read_multiple": full48["read_multiple"],  # at the largest N, per stage, with preflight
        "typical_tokens_per_model": tokens,
        "typical_count": lora48["typical_count"],
        "merge_cpus": merge_cpus,
        "reps_threads": reps_threads,
    }


def project(rates: dict, a: dict, n: int = 48, lora: bool = False) -> dict:
    """Seconds of each stage at 7B (the largest of its reading, network and compute times),
    and the bytes it reads. Full experts: each stage reads the multiple of the inputs that
    scale.py measured (reads of each input by the representation loads and by the merge);
    LoRA experts: as the pools are sized below."""
    model_bytes = a["params"] * a["bytes_per_param"]
    expert_bytes = a["lora_bytes"] if lora else model_bytes
    inputs = model_bytes + n * expert_bytes  # the base and every expert, once
    store = a["storage_bytes_per_s"]
    nic = a["nodes"] * a["nic_bytes_per_s"]
    gpus = a["nodes"] * a["gpus_per_node"]
    flop_token = 2 * a["nonembedding_params"]
    gpu_flops = a["gpu_bf16_flops"] * a["gpu_utilisation"]
    io = lambda b: b / min(store, nic)  # every byte from the shared store crosses a NIC  # noqa: E731
    # the NaN/Inf tests run on the CPU side of each representation actor as its loads read
    # (one CPU per GPU actor: cluster.pools.inference_pool), over every byte they read
    check = lambda b, actors: b / (rates["check_bytes_per_cpu_s"] * actors)  # noqa: E731
    reads = rates["reads_per_input"]
    stages = {}
    # the fingerprints, in a new run directory: full experts' come from the representation
    # loads (nothing read for them); a LoRA expert swapped into an actor rather than loaded
    # reads two pieces of at most 4 KiB of each of its 128 tensors (r 16 on q and v of 32
    # layers), and the base's 291 tensors are read so once for all of them (validate.Fingerprints)
    samples = 291 * 2 * 4096 + n * 128 * 2 * 4096 if lora else 0
    stages["preflight"] = {"bytes": samples, "io_s": io(samples), "compute_s": 0.0}
    fwd_new = a["task_samples"] * a["tokens_per_sample"] * flop_token
    new_bytes = model_bytes + expert_bytes if lora else reads["reps"] * expert_bytes
    stages["reps_new"] = {"bytes": new_bytes, "io_s": io(new_bytes),
                          "compute_s": fwd_new / gpu_flops + check(new_bytes, 1), "flop": fwd_new}
    fwd_others = (n + 1) * a["typical_samples"] * a["tokens_per_sample"] * flop_token
    # full experts: every model loaded once, by one of up to one actor per GPU; LoRA experts:
    # one actor per node (representations.num_actors = nodes), each reading the base once and
    # swapping adapters, since a GPU per expert would read the base 64 times for 0.4 s of compute
    actors = min(gpus, n + 1) if not lora else a["nodes"]
    reps_bytes = reads["reps"] * (inputs - expert_bytes) if not lora else actors * model_bytes + n * expert_bytes
    # what the actors test as they read: with LoRA experts the base was tested by reps_new's
    # load, and the others' actors are told so (pipeline.FiniteCheck, models.LoadedModelSlot)
    tested_others = reps_bytes if not lora else n * expert_bytes
    stages["reps_others"] = {"bytes": reps_bytes, "io_s": io(reps_bytes),
                             "compute_s": fwd_others / (gpu_flops * actors) + check(tested_others, actors),
                             "flop": fwd_others}
    merge_cpus = a["nodes"] * a["merge_actors_per_node"]
    merge_in = reads["merge"] * inputs if not lora else model_bytes + n * expert_bytes
    # LoRA: the low-rank products, sum_q B_q A_q for 64 target matrices of 4096 x 4096 at r 16
    lora_flop = n * 64 * 2 * 4096 * 4096 * 16 if lora else 0
    stages["merge"] = {"bytes": merge_in, "io_s": io(merge_in + model_bytes),  # + the merged model written
                       "compute_s": merge_in / (rates["merge_bytes_per_cpu_s"] * merge_cpus)
                       + lora_flop / (rates["forward_flop_per_cpu_s"] * merge_cpus)}
    for st in stages.values():
        st["seconds"] = max(st["io_s"], st["compute_s"])
    return stages


def cpu_only_forward_s(rates: dict, a: dict, n: int = 48) -> float:
    """reps_others on CPU nodes alone (no GPUs), at the measured FLOP per CPU-second."""
    fwd = (n + 1) * a["typical_samples"] * a["tokens_per_sample"] * 2 * a["nonembedding_params"]
    return fwd / (rates["forward_flop_per_cpu_s"] * a["nodes"] * a["cpus_per_node"])


def main() -> int:
    runs = _load()
    timing = _load(BEFORE_21) if BEFORE_21.is_dir() else None
    if not any(k == "full" for k, _ in runs) or not any(k == "lora" for k, _ in runs):
        print("run benchmarks/scale.py --kind full and --kind lora first", file=sys.stderr)
        return 2
    rates = measured_rates(runs, timing)
    out = {"measured": rates, "assumed": ASSUMED, "full": project(rates, ASSUMED), "lora": project(rates, ASSUMED, lora=True),
           "cpu_only_reps_others_s": cpu_only_forward_s(rates, ASSUMED)}
    lines = ["Measured here (marginal per expert, SmolLM2-135M, 2 cores):", "",
             f"- merge: {rates['merge_bytes_per_cpu_s'] / 1e6:.0f} MB of input per CPU-second"
             f" ({rates['per_expert_s']['merge']:.2f} s per full expert on {rates['merge_cpus']} CPUs)",
             f"- NaN/Inf test (exponent bits, one thread, best of 5): {rates['check_bytes_per_cpu_s'] / 1e6:.0f} MB"
             f" per CPU-second; in the scale run at N = {rates['largest_n']}, on a busy machine:"
             f" {rates['check_bytes_per_cpu_s_in_the_runs'] / 1e6:.0f} MB per CPU-second"
             f" ({rates['check_seconds_at_largest_n']:.1f} s in all)",
             f"- reads of each input (full experts, N = {rates['largest_n']}): representation loads"
             f" {rates['reads_per_input']['reps']:.3f}, merge {rates['reads_per_input']['merge']:.3f}; all stages"
             f" {rates['read_multiple']['total']:.3f}x the inputs, fingerprints included",
             f"- representation forward: {rates['forward_flop_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second"
             f" ({rates['typical_tokens_per_model']} tokens per model, {rates['per_expert_s']['reps_others_lora']:.2f} s"
             f" per LoRA expert on {rates['reps_threads']} threads)",
             "- model load in a representation actor: " + (
                 f"{rates['load_bytes_per_s'] / 1e6:.0f} MB/s" if rates["load_bytes_per_s"] else "not separable from noise")
             + f" ({rates['per_expert_s']['reps_others_full']:.2f} s per full expert, less the LoRA expert's)", ""]
    for kind in ("full", "lora"):
        st = out[kind]
        total = sum(s["seconds"] for s in st.values())
        lines += [f"Projected, N = 48 {kind} experts of 7B on {ASSUMED['nodes']} nodes x {ASSUMED['gpus_per_node']} GPUs:", "",
                  "| stage | bytes read (GB) | reading s | compute s | stage s | share |", "|---|---:|---:|---:|---:|---:|"]
        for name, s in st.items():
            lines.append(f"| {name} | {s['bytes'] / 1e9:.1f} | {s['io_s']:.1f} | {s['compute_s']:.2f} | {s['seconds']:.1f}"
                         f" | {100 * s['seconds'] / total:.0f}% |")
        inputs = ASSUMED["params"] * ASSUMED["bytes_per_param"] + 48 * (ASSUMED["lora_bytes"] if kind == "lora" else
                                                                       ASSUMED["params"] * ASSUMED["bytes_per_param"])
        read = sum(s["bytes"] for s in st.values())
        lines += [f"| total (without fixed costs) | {read / 1e9:.0f} ({read / inputs:.2f}x the inputs) | | |"
                  f" {total:.0f} | |", ""]
    lines.append(f"On CPU-only nodes ({ASSUMED['nodes']} x {ASSUMED['cpus_per_node']} cores) the full experts' representation"
                 f" forwards alone would take {out['cpu_only_reps_others_s']:.0f} s at the measured rate.")
    (RESULTS / "cost_model.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "cost_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
