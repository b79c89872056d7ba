"""Supervised fine-tuning data, pure: a (prompt, target) record becomes token ids with the
loss on the target only; batches are padded and ordered deterministically. The Ray Train
step (recall_ray.cluster.finetune), EWC's Fisher and LM-Cocktail's loss all use these, so
"the loss on a record" means one thing everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF causal LMs) skip


def build_example(prompt_ids: Sequence[int], target_ids: Sequence[int], eos_id: int,
                  max_length: int) -> tuple[list[int], list[int]]:
    """One training example: `input_ids = prompt + target + [eos]`, labels only on the target.

    The loss is on the target tokens and the EOS that ends them (so the model learns to stop);
    prompt positions get IGNORE_INDEX. Sequences longer than `max_length` keep the target and
    lose the *start* of the prompt: the end of the prompt (question, options, response cue) is
    what the target depends on most. At least one prompt token is kept, since a causal LM never
    predicts position 0; if the target alone does not fit, its tail (then the EOS) is cut.
    """
    prompt, answer = keep_end(prompt_ids, list(target_ids) + [eos_id], max_length)
    input_ids = prompt + answer
    labels = [IGNORE_INDEX] * len(prompt) + answer
    return input_ids, labels


def keep_end(prompt_ids: Sequence[int], answer_ids: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """(prompt, answer) cut to at most `max_length` tokens together, as a fine-tune example is:
    the answer is kept whole and the *start* of the prompt goes (a passage's beginning, never
    the question, options or response cue at its end); at least one prompt token stays, and an
    answer that alone does not fit loses its tail. Shared by the fine-tune (build_example) and
    the representation stage (represented_ids), so that RECALL represents the text the
    experts were trained on."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not prompt_ids:
        raise ValueError("empty prompt: a causal LM needs at least one token before the target")
    answer = list(answer_ids)[: max_length - 1]
    prompt = list(prompt_ids)[-(max_length - len(answer)):]
    return prompt, answer


def represented_ids(prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int) -> list[int]:
    """The token ids RECALL represents for a (prompt, target) record: prompt + target cut by
    keep_end (the fine-tune's rule), without the EOS the fine-tune appends. A record that fits
    is prompt + target unchanged."""
    prompt, answer = keep_end(prompt_ids, target_ids, max_length)
    return prompt + answer


def represented_batch(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                      max_length: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (right-padded) of represented_ids for each record, the
    prompt tokenised with the tokenizer's special tokens and the target without, as
    tokenize_records does for the fine-tune."""
    p_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    t_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    rows = [represented_ids(p, t, max_length) for p, t in zip(p_ids, t_ids)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate([(r, r) for r in rows], pad)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: padding gets attention 0 and label IGNORE_INDEX."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of each step's batch: successive seeded permutations of range(n), cut into
    batches of `batch_size` (so the data cycles when steps * batch_size > n). Pure and
    deterministic: the same (n, batch_size, steps, seed) always gives the same order."""
    import torch

    if n <= 0 or batch_size <= 0 or steps < 0:
        raise ValueError(f"need n > 0, batch_size > 0, steps >= 0; got {n}, {batch_size}, {steps}")
    gen = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream.extend(torch.randperm(n, generator=gen).tolist())
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share of the records: every world_size-th item starting at rank."""
    return list(items[rank::world_size])


def tokenize_records(tokenizer: Any, records: Sequence[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Tokenise prompt and target separately (prompt with the tokenizer's special tokens, e.g.
    BOS; target without) and build masked examples."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the base model's tokenizer has no eos_token: the target cannot be terminated")
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=True)["input_ids"]
    targets = tokenizer([r["target"] for r in records], add_special_tokens=False)["input_ids"]
    return [build_example(p, t, tokenizer.eos_token_id, max_length) for p, t in zip(prompts, targets)]


def target_loss(lm: torch.nn.Module, tokenizer, records: Sequence[dict], max_length: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token (target + EOS) of `records` ({prompt, target}),
    the prompt masked out, exactly the fine-tuning loss."""
    import torch

    examples = tokenize_records(tokenizer, records, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad)
            logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no answer tokens to measure a loss on")
    return total / count
