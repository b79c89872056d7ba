"""The pure core of recall-ray: functions of arrays, tensors and tables, and plain
dataclasses. Nothing here imports Ray or starts work elsewhere; the Ray shell
(recall_ray.cluster) runs these where the data and the models are, and the tests check
every number they compute against an independent float64 reference.

    similarity     per-layer similarity kernels (a registry), softmax weights, `layer_weights`
    typical        KMeans per layer and the typical samples (D_type)
    pooling        per-layer mean of the hidden states over real tokens
    merge_rule     the weighted sum of one tensor, from the base outward, in float32
    task_vectors   task arithmetic, TIES' trim and consensus, DARE's drop and rescale
    merge_methods  the merge methods by name (a registry), with their mergekit export
    lora           exact LoRA folding, and the checks that an adapter fits its base
    ewc            EWC's diagonal Fisher and penalty on LoRA deltas
    sft            supervised fine-tuning examples: masking, padding, order, the loss
    metrics        the paper's task metrics; templates: records -> (prompt, target)
    architectures  parameter-name templates per model family, and the layer grouping
    analysis       adjacent-layer similarity, forgetting curves, paired sign tests
"""

# The public names, imported on first use (PEP 562): importing one core module (as every Ray
# actor does) must not pull in the others' dependencies, e.g. scikit-learn for KMeans, which
# costs a merge actor about 130 MB.
_EXPORTS = {
    "KERNELS": "similarity", "NORMALIZERS": "similarity", "LayerWeights": "similarity",
    "layer_similarity": "similarity", "layer_weights": "similarity", "softmax_weights": "similarity",
    "typical_indices": "typical", "union_in_order": "typical",
    "KINDS": "merge_methods", "METHODS": "merge_methods", "MergeMethod": "merge_methods",
    "build_method": "merge_methods",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
