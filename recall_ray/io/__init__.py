"""Where every byte enters and leaves recall-ray: model directories and their safetensors
(`safetensors_io`, `models`, `builtin_models`), the run directory and staged outputs
(`storage`), representation Parquet (`reps_parquet`) and task data splits (`splits`).

Kept in one package so that the layout shows the I/O: a new place to keep bytes (an object
store, say) is a change here, and the rest of the code reads and writes through it.
"""
