"""Score a committed long expert (adapters/forgetting/<task>) on ARC-Easy's validation split,
the budget rule's probe, and compare its predictions with the budget's published ones
(docs/results/forgetting_budget/predictions.jsonl, model "<task>@<rung>"): the check that
the SST-2 expert's validation/test gap (README.md) is not a mix-up of adapters.

    python docs/results/forgetting_matrix/check_validation.py sst2 sst2@1ep

In-process (no Ray), one torch thread: about 2 minutes on 2 CPU cores."""
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from recall_ray.cluster.generation import EvalWorker  # noqa: E402
from recall_ray.evaluate import build_items  # noqa: E402
from recall_ray.io.models import resolve_model, resolve_path  # noqa: E402
from recall_ray.studies.common import read_predictions  # noqa: E402


def main(task: str, rung: str) -> None:
    torch.set_num_threads(1)
    base = resolve_path("builtin:smollm2-135m-instruct")
    model = resolve_model(task, str(REPO / "adapters" / "forgetting" / task), base)
    items = build_items(REPO / "data", ["arc_easy"], "validation", None)
    worker = EvalWorker([model])
    pred = read_predictions(REPO / "docs" / "results" / "forgetting_budget" / "predictions.jsonl")
    published = {r["sample_id"]: r for r in pred[(pred.model == rung) & (pred.task == "arc_easy")].to_dict("records")}
    if len(published) != len(items):
        raise SystemExit(f"{rung}: {len(published)} published ARC-Easy predictions, {len(items)} validation items")
    same = right = 0
    worst = 0.0
    for s in range(0, len(items), 16):
        chunk = items[s:s + 16]
        for item, (answer, lp) in zip(chunk, worker._choose(0, [i.prompt for i in chunk],
                                                             [list(i.options) for i in chunk])):
            pub = published[item.sample_id]
            index = str(list(item.options).index(answer))
            same += index == pub["prediction"]
            right += index in item.refs
            worst = max(worst, max(abs(a - sum(b)) for a, b in zip(pub["option_logprobs"], lp)))
    print(f"{task} ({rung}): {len(items)} validation items, {same} predictions as published, {right} right"
          f" ({100 * right / len(items):.1f}%), option log-probabilities within {worst:.1e}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
