"""Choosing merge settings on the validation split, never on test.

A selection config names a scenario config and the settings to choose, one parameter
after another; each candidate is a set of `--set` overrides scored by the scenario itself
on the validation split (the last 200 train records, never trained on):

    scenario: configs/scenarios/multi.yaml
    run_dir: runs/select_multi
    set: [include_base=[true], evaluate.max_samples=30]     # every candidate
    parameters:                                             # chosen in this order
      - name: lambda
        methods: [task_arithmetic]                          # the methods it is scored on
        values: [{baselines.lam: 0.5}, {baselines.lam: 1.0}]

A candidate's score is the mean over the scenario's tasks of the primary validation
metric, averaged over the parameter's methods (and variants); the best is fixed for every
later parameter, the first listed winning a tie. On a sequential scenario the methods are
its lines (a chain such as `recall`, `seqft`, `ewc`), all of which run (turn the others off
with `set`), and a candidate's score is the mean over every task seen at the last step. Every candidate runs in the same run
directory, so what it shares with an earlier one (representations, unchanged merges,
scores of unchanged models) is reused, not recomputed.

Beside each candidate's score, one-shot scenarios (single, multi) get it paired against the
first candidate on the same samples (`paired_n` samples; `only_this`, `only_first`,
`p_vs_first`: how many each alone got right, and the sign test), which says whether a
lead is more than noise.

Writes <run_dir>/selection.csv and selection.md (every candidate's scores) and
selected.yaml (the chosen overrides, to copy into the scenario configs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import Field, field_validator

from ..config import ConfigError, Section, load_tree, validate

log = logging.getLogger("recall_ray.selection")

_SCORE_COLUMNS = ("variant", "model", "mean")


class Parameter(Section):
    name: str
    methods: list[str] = Field(min_length=1)
    values: list[dict[str, Any]] = Field(min_length=1)  # each: {dotted.key: value, ...}

    @field_validator("values")
    @classmethod
    def _non_empty(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if any(not c for c in v):
            raise ValueError("every candidate needs at least one key: value")
        return v


class SelectionConfig(Section):
    scenario: str  # path of a scenario config (single, multi or sequential)
    run_dir: str
    set: list[str] = []
    parameters: list[Parameter] = Field(min_length=1)


def load_selection(path: str, overrides: list[str] = ()) -> SelectionConfig:
    return validate(SelectionConfig, load_tree(path, overrides, "selection config"))


def assignments(values: dict[str, Any]) -> list[str]:
    """{a.b: 1, c: [x]} -> ['a.b=1', 'c=[x]'] (values written as YAML flow, as --set reads them)."""
    out = []
    for key, value in values.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        out.append(f"{key}={text}")
    return out


def candidate_score(table: pd.DataFrame, methods: list[str]) -> float:
    """Mean over the rows of `methods` (every variant) of the per-row mean over tasks."""
    rows = table[table["model"].isin(methods)]
    missing = sorted(set(methods) - set(rows["model"]))
    if missing:
        raise ValueError(f"the scenario's table has no row for {missing}")
    return float(rows["mean"].mean())


def final_step_rows(table: pd.DataFrame) -> pd.DataFrame:
    """A sequential scenario's table (a row per step and method) as candidate_score reads a
    single or multi one: the last step's rows, `method` as `model`, `mean_seen` as `mean`."""
    last = table[table["step"] == table["step"].max()]
    return last.rename(columns={"method": "model", "mean_seen": "mean"}).reset_index(drop=True)


def ewc_penalty_columns(run_dir: str | Path) -> dict[str, float]:
    """The EWC penalty's share of the loss in a sequential run's penalised fine-tunes
    (its ewc_penalty.csv), as columns of the EWC row: the mean and the largest over the
    steps. Empty when the run has no EWC line."""
    f = Path(run_dir, "ewc_penalty.csv")
    if not f.is_file():
        return {}
    share = pd.read_csv(f)["penalty_share"]
    return {"ewc_penalty_share": float(share.mean()), "ewc_penalty_share_max": float(share.max())} if len(share) else {}


def is_sequential(scenario_path: str) -> bool:
    p = Path(scenario_path)
    if not p.is_file():
        raise ConfigError(f"scenario config {scenario_path} does not exist")
    return (yaml.safe_load(p.read_text()) or {}).get("scenario") == "sequential"


def best_index(scores: list[float]) -> int:
    """The highest score; the first on a tie (candidates are listed default first)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def candidate_predictions(run_dir: str | Path, variants: list[str], methods: list[str]) -> pd.DataFrame | None:
    """The predictions of `methods` in the evaluations a one-shot scenario just wrote in
    `run_dir` (<variant>/eval/predictions.jsonl, for the variants it ran: a variant left
    from an earlier run of the directory is not this candidate's), or None when there is
    none. Each sample id is prefixed with its variant and method, so that the rows of every
    variant and method pair up with the same rows of another candidate and nothing else."""
    from .common import read_predictions

    parts = []
    for where in variants:
        f = Path(run_dir, where, "eval", "predictions.jsonl")
        if not f.is_file():
            continue
        preds = read_predictions(f)
        preds = preds[preds["model"].isin(methods)]
        parts.append(preds.assign(sample_id=where + "/" + preds["model"] + "/" + preds["sample_id"].astype(str)))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else None


def paired_with_first(predictions: list[pd.DataFrame | None]) -> list[dict[str, Any]]:
    """Each candidate against the first one listed (the setting before selection), over all
    the samples both were scored on: how many samples were paired, how many this one alone
    got right, how many the first alone, and the sign test's p-value. Empty for the first
    candidate, and for any candidate (or a first one) without predictions."""
    from ..core.analysis import paired_comparison

    first = predictions[0] if predictions else None
    out: list[dict[str, Any]] = [{}]
    for preds in predictions[1:]:
        if first is None or preds is None:
            out.append({})
            continue
        both = pd.concat([first.assign(model="first"), preds.assign(model="this")], ignore_index=True)
        cmp = paired_comparison(both, "this", "first")
        row = cmp[cmp["task"] == "all"] if (cmp["task"] == "all").any() else cmp
        r = row.iloc[0]
        out.append({"paired_n": int(r["n"]), "only_this": int(r["only_a"]), "only_first": int(r["only_b"]),
                    "p_vs_first": float(r["p_value"])})
    return out


def candidate_overrides(cfg: SelectionConfig, param: Parameter, values: dict[str, Any],
                        chosen: dict[str, Any]) -> list[str]:
    """The --set list of one candidate: the common overrides, the validation split, what was
    chosen before, this candidate, only the methods it is scored on (a sequential scenario
    has no `methods`: its lines are set in the scenario config or `set`)."""
    only = [] if is_sequential(cfg.scenario) else assignments({"methods": param.methods})
    return [*cfg.set, f"run_dir={cfg.run_dir}", "evaluate.split=validation", *assignments(chosen),
            *assignments(values), *only]


def run_selection(cfg: SelectionConfig, run_scenario, load_scenario) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Score every candidate (Ray must be up); returns (every candidate's rows, chosen overrides).
    `run_scenario` (any scenario kind) and `load_scenario` are the scenario modules' (passed
    in, so that this module stays free of Ray)."""
    chosen: dict[str, Any] = {}
    rows = []
    for param in cfg.parameters:
        scores, predictions, first_row = [], [], len(rows)
        for values in param.values:
            sc = load_scenario(cfg.scenario, candidate_overrides(cfg, param, values, chosen))
            log.info("selection: %s = %s", param.name, values)
            table = run_scenario(sc).table
            if sc.scenario == "sequential":
                table = final_step_rows(table)
                for col, v in ewc_penalty_columns(sc.run_dir).items():  # how much EWC's penalty weighed
                    table.loc[table["model"] == "ewc", col] = v
                predictions.append(None)  # its score is the last step's: no pairing over every step's samples
            else:
                from .common import variant_names

                predictions.append(candidate_predictions(
                    sc.run_dir, variant_names(sc.scenario, sc.tasks, sc.include_base), param.methods))
            scores.append(candidate_score(table, param.methods))
            label = ", ".join(assignments(values))
            for r in table[table["model"].isin(param.methods)].to_dict(orient="records"):
                rows.append({"parameter": param.name, "candidate": label, "_index": len(scores) - 1, **r})
        # Is a lead over the first candidate more than noise? Paired over the same samples.
        against = paired_with_first(predictions)
        for r in rows[first_row:]:
            r.update(against[r.pop("_index")])
        best = best_index(scores)
        chosen.update(param.values[best])
        for r in rows:
            if r["parameter"] == param.name:
                r["chosen"] = r["candidate"] == ", ".join(assignments(param.values[best]))
    table = pd.DataFrame(rows)
    front = ["parameter", "candidate", "chosen", *[c for c in _SCORE_COLUMNS if c in table],
             *[c for c in ("paired_n", "only_this", "only_first", "p_vs_first") if c in table]]
    return table[front + [c for c in table.columns if c not in front]], chosen


def write_selection(root, table: pd.DataFrame, chosen: dict[str, Any], source: str) -> None:
    from ..report import markdown_table

    table = table.copy()
    for c in ("paired_n", "only_this", "only_first"):  # counts, blank for the first candidate
        if c in table:
            table[c] = table[c].map(lambda n: "" if pd.isna(n) else str(int(n)))
    for c in ("p_vs_first", "ewc_penalty_share", "ewc_penalty_share_max"):  # significant digits, not two decimals
        if c in table:
            table[c] = table[c].map(lambda p: "" if pd.isna(p) else f"{p:.3g}")
    root.write_text("selection.csv", table.to_csv(index=False, float_format="%.2f"))
    root.write_text("selection.md", markdown_table(table))
    root.write_text("selected.yaml", f"# chosen on the validation split by jobs/select_settings.py --config {source}\n"
                    + yaml.safe_dump(chosen, sort_keys=False))


def publish_selection(run_dir: str, dest: str) -> list[str]:
    """Copy a finished selection's files and its stage times (every candidate's merges and
    evaluations, as first computed) into `dest`, replacing what was there."""
    import shutil

    from ..io.storage import staged
    from .common import stage_times

    src = Path(run_dir)
    names = ["selection.csv", "selection.md", "selected.yaml"]
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} holds no finished selection (no {', '.join(missing)}): run it first")
    with staged(str(dest), overwrite=True) as tmp:
        for n in names:
            shutil.copy2(src / n, Path(tmp) / n)
        stage_times(src).to_csv(Path(tmp) / "stage_times.csv", index=False, float_format="%.1f")
    return names + ["stage_times.csv"]


__all__ = ["publish_selection", "SelectionConfig", "load_selection", "run_selection", "write_selection", "candidate_score", "best_index",
           "assignments"]
