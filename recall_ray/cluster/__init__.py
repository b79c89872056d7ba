"""The Ray shell around the pure core: the runtime every job starts or joins
(`runtime`), the sizing of actor pools (`pools`), and the actors and tasks that run the
core's functions where the data and the models are:

    representations  Ray Data actor pool: texts -> per-layer mean-pooled hidden states (Parquet)
    generation       Ray Data actor pool: prompts -> greedy continuations (evaluation)
    merge            merge actors, one output shard per call, reading tensors lazily
    finetune         Ray Train LoRA SFT (DDP or DeepSpeed), EWC's Fisher in a Ray task
    tasks            small Ray tasks: KMeans per layer, the NaN/Inf scan, LM-Cocktail's losses
"""
