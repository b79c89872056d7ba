"""Log-likelihood scoring of closed-label tasks, as OpenCompass's perplexity mode and
lm-eval-harness's multiple-choice tasks do: the model's answer is the option whose
continuation of the prompt it finds most likely; no text is generated.

Tokens: the prompt is tokenised with the tokenizer's special tokens and each option (or
reference) without, exactly as a training example is built (core.sft.build_example), so the
option the model was trained to write is the one scored. No EOS is appended.

    log p(option | prompt) = sum over the option's tokens t_j of log p(t_j | prompt, t_<j)

Normalisation (`choose`): "sum" ranks options by that sum (lm-eval's `acc`); "mean" by the
sum divided by the option's token count (a length-normalised variant). The two agree when
every option is one token (SST-2's label words, the A-D letters); AG News's "Sci/Tech" is
three tokens on SmolLM2's tokenizer, the other labels one.

Cost: one forward per row of (prompt + option), batched; when every option of a prompt is a
single token, one forward of the prompt alone gives all of them (the next-token
distribution at its last position). The LM head is applied only where a token is scored,
not to every position (its [batch, length, vocab] output is the largest tensor of a forward).
"""

from __future__ import annotations

from typing import Sequence

import torch

NORMALIZATIONS = ("sum", "mean")


def _decoder_and_head(lm):
    """The decoder stack (its last hidden state after the final norm) and the LM head, so
    that logits can be computed for the scored positions only."""
    return getattr(lm, lm.base_model_prefix), lm.get_output_embeddings()


def continuation_logprobs(lm, rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                          device: str | torch.device = "cpu", max_rows: int = 32) -> list[list[float]]:
    """For each (context ids, continuation ids): the log-probability of every continuation
    token given everything before it, in float32. Rows are right-padded (a causal model's
    real tokens never see padding on their right, and positions stay 0..n-1) and run
    `max_rows` at a time."""
    decoder, head = _decoder_and_head(lm)
    out: list[list[float]] = []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        seqs = [list(c) + list(t) for c, t in chunk]
        if any(not c for c, _ in chunk):
            raise ValueError("every row needs at least one context token: a causal LM never predicts position 0")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, :len(s)] = 1
        with torch.inference_mode():
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            # position p predicts token p + 1: the continuation's tokens are predicted from
            # the last context position up to the one before the last token
            where = [(b, len(c) - 1 + j) for b, (c, t) in enumerate(chunk) for j in range(len(t))]
            if not where:
                out.extend([] for _ in chunk)
                continue
            bi = torch.tensor([b for b, _ in where], device=hidden.device)
            pi = torch.tensor([p for _, p in where], device=hidden.device)
            logp = torch.log_softmax(head(hidden[bi, pi]).float(), dim=-1)
            targets = torch.tensor([tok for _, t in chunk for tok in t], device=logp.device)
            picked = logp[torch.arange(len(where), device=logp.device), targets].cpu().tolist()
        k = 0
        for _, t in chunk:
            out.append(picked[k:k + len(t)])
            k += len(t)
    return out


def option_logprobs(lm, contexts: Sequence[Sequence[int]], options: Sequence[Sequence[Sequence[int]]], pad_id: int,
                    device: str | torch.device = "cpu", max_rows: int = 32) -> list[list[list[float]]]:
    """Per context c, per option o of options[c]: the log-probability of each of o's tokens.
    A context whose options are all single tokens takes one forward (of the context alone);
    the others one row per option."""
    single = [all(len(o) == 1 for o in opts) for opts in options]
    if any(not c for c in contexts):
        raise ValueError("every context needs at least one token: a causal LM never predicts position 0")
    first: list[list[float]] = []
    if any(single):
        first = _next_token_logprobs(lm, [c for c, s in zip(contexts, single) if s],
                                     [[o[0] for o in opts] for opts, s in zip(options, single) if s], pad_id, device,
                                     max_rows)
    multi = [(c, o) for c, opts, s in zip(contexts, options, single) if not s for o in opts]
    multi_lp = continuation_logprobs(lm, multi, pad_id, device, max_rows) if multi else []
    out, fi, mi = [], 0, 0
    for opts, s in zip(options, single):
        if s:
            out.append([[v] for v in first[fi]])
            fi += 1
        else:
            out.append(multi_lp[mi:mi + len(opts)])
            mi += len(opts)
    return out


def _next_token_logprobs(lm, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]], pad_id: int,
                         device, max_rows: int) -> list[list[float]]:
    """log p(token | context) for each candidate token of each context: one forward per
    context (right-padded batches), the LM head at its last position only."""
    decoder, head = _decoder_and_head(lm)
    out: list[list[float]] = []
    for start in range(0, len(contexts), max_rows):
        chunk = contexts[start:start + max_rows]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, c in enumerate(chunk):
            ids[b, :len(c)] = torch.tensor(list(c), dtype=torch.long)
            mask[b, :len(c)] = 1
        with torch.inference_mode():
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            last = torch.tensor([len(c) - 1 for c in chunk], device=hidden.device)
            logp = torch.log_softmax(head(hidden[torch.arange(len(chunk), device=hidden.device), last]).float(), -1)
            for b, cands in enumerate(candidates[start:start + max_rows]):
                out.append(logp[b, torch.tensor(list(cands), device=logp.device)].cpu().tolist())
    return out


def choose(token_logprobs: Sequence[Sequence[float]], normalization: str = "sum") -> int:
    """The index of the most likely option (the first on a tie): by the sum of its tokens'
    log-probabilities, or by their mean."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}: use {' or '.join(NORMALIZATIONS)}")
    if not token_logprobs or any(len(t) == 0 for t in token_logprobs):
        raise ValueError("every option needs at least one token")
    scores = [sum(t) / (len(t) if normalization == "mean" else 1) for t in token_logprobs]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
