"""EWC (Elastic Weight Consolidation, Kirkpatrick et al. 2017) for LoRA fine-tunes: a pure core
of tensor functions, no Ray (the Ray shells are `cluster.finetune.fisher_of` and
`finetune_lora`'s `ewc_fisher` / `ewc_lambda`; a Fisher is saved and loaded by
`safetensors_io.save_fisher` / `load_fisher`).

EWC adds to the new task's loss a quadratic pull towards the previous tasks' optimum theta*,
weighted per parameter by the diagonal of the Fisher information F of those tasks:

    loss = task loss + lam / 2 * sum_i F_i * (theta_i - theta*_i)^2

Here every fine-tune starts from the previous (folded) model theta* and trains a LoRA
adapter whose B starts at zero, so the effective weight of a targeted linear layer is
W* + scaling * B @ A and the deviation from theta* is exactly the LoRA delta
`scaling * B @ A` (`lora_deltas`); untargeted weights never move and carry no penalty. The
Fisher is therefore kept only for the full weight matrices of the LoRA-targeted layers,
keyed by their names in the plain model (`model.layers.0.self_attn.q_proj.weight`).

Over several past tasks the penalty uses the sum of their Fishers (`accumulate`), anchored at
the latest model theta*_{t-1}: the "online EWC" form (Huszar 2018; Schwarz et al. 2018 with
gamma = 1), which is what a chain of folded models gives naturally, rather than one anchor per
past task.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .sft import IGNORE_INDEX, collate

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the plain model


# ----------------------------------------------------------------------------- names


def module_matches(module: str, target_modules: Iterable[str]) -> bool:
    """PEFT's rule for a list of `target_modules`: the module's full name equals a target or
    ends with "." + target (so "q_proj" matches every layer's self_attn.q_proj)."""
    return any(module == t or module.endswith(f".{t}") for t in target_modules)


def target_weight_names(param_names: Iterable[str], target_modules: Sequence[str]) -> list[str]:
    """The `.weight` parameters of the modules a LoRA on `target_modules` wraps, in the
    given order: the keys an EWC Fisher must have."""
    return [n for n in param_names if n.endswith(".weight") and module_matches(n[: -len(".weight")], target_modules)]


def check_keys(fisher_keys: Iterable[str], expected: Iterable[str], what: str = "EWC Fisher") -> None:
    """ValueError naming the missing and unexpected keys unless the two sets are equal."""
    have, want = set(fisher_keys), set(expected)
    if have == want:
        return
    missing, extra = sorted(want - have), sorted(have - want)

    def show(names: list[str]) -> str:
        return ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) of the LoRA-targeted weights: {show(missing)}")
    if extra:
        parts.append(f"{len(extra)} key(s) that no LoRA module targets: {show(extra)}")
    raise ValueError(f"{what} does not match the LoRA-targeted modules: {'; '.join(parts)}"
                     " (compute the Fisher with the same target_modules as the fine-tune)")


# ----------------------------------------------------------------------------- Fisher


def example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the token negative log-likelihoods over the labelled positions of a [1, T]
    example (position j's logits predict token j + 1, as in HF causal LMs)."""
    return F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")


def diagonal_fisher(model: torch.nn.Module, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                    param_names: Sequence[str], pad_id: int) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of the named parameters of a plain causal LM:

        F = 1/N * sum_n (d loss_n / d theta)^2

    where loss_n is example n's *summed* token NLL over its labelled positions (the target and
    its EOS), i.e. -log p(target | prompt), whose gradient is the score of the whole answer
    (a per-token mean would shrink long answers' Fisher by 1 / tokens^2). The squared
    gradient is taken one example at a time (per-example gradients), never the square of a
    batch gradient. `examples` are (input_ids, labels) pairs from `sft.tokenize_records`;
    the model runs in eval mode (no dropout) and its requires_grad flags and mode are
    restored afterwards. Returns float32 tensors on the model's device, keyed by
    `param_names`. Only one example runs at a time, so `pad_id` pads nothing; it is kept for
    `collate`'s sake.
    """
    if not examples:
        raise ValueError("diagonal_fisher needs at least one example")
    params = dict(model.named_parameters())
    missing = [n for n in param_names if n not in params]
    if missing:
        raise KeyError(f"the model has no parameter(s) {missing[:6]}")
    targets = [params[n] for n in param_names]
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    device = targets[0].device if targets else torch.device("cpu")
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in zip(param_names, targets)}
    try:
        model.eval()
        for p in params.values():
            p.requires_grad_(False)
        for p in targets:
            p.requires_grad_(True)
        for ids, labels in examples:
            batch = collate([(list(ids), list(labels))], pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            loss = example_nll(logits, batch["labels"].to(device))
            grads = torch.autograd.grad(loss, targets)
            for n, g in zip(param_names, grads):
                fisher[n] += g.detach().float().pow(2)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return {n: f / len(examples) for n, f in fisher.items()}


def accumulate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Elementwise sum of two Fishers with the same keys: EWC's penalty over several past
    tasks is the penalty of the sum of their Fishers."""
    check_keys(b, a, "the Fishers to add")
    out = {}
    for n in a:
        if a[n].shape != b[n].shape:
            raise ValueError(f"Fisher {n}: shapes {tuple(a[n].shape)} and {tuple(b[n].shape)} differ")
        out[n] = a[n].float() + b[n].float().to(a[n].device)
    return out


# ----------------------------------------------------------------------------- penalty


def lora_deltas(peft_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each LoRA-wrapped linear layer's weight delta `scaling * B @ A` (transposed for
    fan_in_fan_out layers, summed over its active adapters), keyed by the base weight's name
    in the plain model: `base_model.model.model.layers.0.self_attn.q_proj` gives
    `model.layers.0.self_attn.q_proj.weight`. The tensors keep the autograd graph (they go
    into the loss). Pass the PeftModel itself, not a DDP / DeepSpeed wrapper."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        active = [a for a in module.active_adapters if a in module.lora_A]
        if not active:
            continue
        delta = None
        for a in active:
            if module.use_dora.get(a):
                raise NotImplementedError(f"{name}: DoRA adapters are not supported by EWC")
            wa, wb = module.lora_A[a].weight, module.lora_B[a].weight
            if wa.dim() != 2 or wb.dim() != 2:
                raise NotImplementedError(f"{name}: EWC supports LoRA on linear layers only")
            d = (wb @ wa) * module.scaling[a]
            if getattr(module, "fan_in_fan_out", False):
                d = d.T
            delta = d if delta is None else delta + d
        base = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        out[f"{base}.weight"] = delta
    return out


def ewc_penalty(fisher: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lam / 2 * sum over names of sum(F * delta^2): EWC's penalty for moving the previous
    optimum theta* by `deltas` (for a fine-tune that starts at theta*, the LoRA deltas). The
    keys must be the same; computed in float32 at least, differentiable in `deltas`."""
    check_keys(fisher, deltas)
    total = None
    for n, d in deltas.items():
        f = fisher[n]
        if f.shape != d.shape:
            raise ValueError(f"EWC Fisher {n} has shape {tuple(f.shape)}, the LoRA delta {tuple(d.shape)}")
        dtype = torch.promote_types(d.dtype, torch.float32)
        term = (f.to(device=d.device, dtype=dtype) * d.to(dtype).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total * (lam / 2)
