"""The studies by kind: config -> checks (before Ray) -> run (Ray up) -> publish."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ConfigError, RayConfig, Section, load_tree, validate
from . import common, oneshot, selection, sequential


@dataclass(frozen=True)
class Study:
    kind: str
    config: type[Section]
    preflight: Callable[[Any], Any]  # every check that needs no Ray; raises with the fix
    run: Callable[[Any], Any]  # Ray must be up; returns a common.StudyResult (selection: its own)
    publish: Callable[[str, str], list[str]]  # (run_dir, dest) -> the files copied
    ray: Callable[[Any], RayConfig]  # the runtime the study asks for


def _selection_preflight(cfg: selection.SelectionConfig) -> Any:
    """Every candidate's config is loaded (so a bad candidate fails now), and the study it
    runs makes its own checks."""
    first = None
    for param in cfg.parameters:
        for values in param.values:
            sc = load_study(cfg.scenario, selection.candidate_overrides(cfg, param, values, {}))
            if isinstance(sc, selection.SelectionConfig):
                raise ConfigError(f"selection config {cfg.scenario!r} names another selection: name a study config"
                                  " (single, multi or sequential)")
            first = first or sc
    STUDIES[first.scenario].preflight(first)
    return first


def _selection_run(cfg: selection.SelectionConfig) -> Any:
    return selection.run_selection(cfg, lambda sc: STUDIES[sc.scenario].run(sc), load_study)


def _selection_ray(cfg: selection.SelectionConfig) -> RayConfig:
    return _selection_preflight(cfg).ray


_ONESHOT = dict(config=oneshot.ScenarioConfig, preflight=oneshot.preflight, run=oneshot.run_scenario,
                publish=common.publish, ray=lambda cfg: cfg.ray)

STUDIES: dict[str, Study] = {
    "single": Study("single", **_ONESHOT),
    "multi": Study("multi", **_ONESHOT),
    "sequential": Study("sequential", sequential.SequentialConfig, sequential.preflight, sequential.run_sequential,
                        common.publish, lambda cfg: cfg.ray),
    "selection": Study("selection", selection.SelectionConfig, _selection_preflight, _selection_run,
                       selection.publish_selection, _selection_ray),
}


def kind_of(tree: dict) -> str:
    """A config's study kind: `scenario: single|multi|sequential`, or a selection (whose
    `scenario` names the study config it runs, and which lists `parameters`)."""
    if "parameters" in tree:
        return "selection"
    kind = tree.get("scenario")
    if kind not in STUDIES or kind == "selection":
        raise ConfigError(f"config key 'scenario': {kind!r} is not a study; use one of single, multi, sequential"
                          " (a selection config names a study config and lists `parameters`)")
    return kind


def load_study(path: str, overrides: list[str] = ()) -> Any:
    """A study's validated config (ScenarioConfig, SequentialConfig or SelectionConfig),
    from its YAML file and `--set` overrides."""
    tree = load_tree(path, overrides, "study config")
    return validate(STUDIES[kind_of(tree)].config, tree)


def study_of(cfg: Any) -> Study:
    return STUDIES["selection" if isinstance(cfg, selection.SelectionConfig) else cfg.scenario]


def run_study(cfg: Any) -> Any:
    """A study from its config: every check before Ray starts, then the run on the runtime
    it asks for (joined, or started locally and stopped after)."""
    from ..cluster.runtime import ray_runtime

    study = study_of(cfg)
    study.preflight(cfg)
    with ray_runtime(study.ray(cfg)):
        return study.run(cfg)
