"""Studies: the paper's experiments as jobs (jobs/scenario.py, jobs/select_settings.py), each
one YAML config and one resumable run directory. `registry.STUDIES` maps each kind to its
config, checks, run and publish step:

    single, multi   oneshot.py     every method merges the same experts once (Tables 1, 2)
    sequential      sequential.py  tasks learned one after another (Table 7, Figure 5)
    selection       selection.py   settings chosen on the validation split, by running a study
                                   once per candidate

What they share (the evaluation section, the checks before Ray, the merges of a set of
models by every method, scoring, the published files) is in common.py.
"""
