"""Log-likelihood scoring of closed-label tasks, as OpenCompass's perplexity mode and
lm-eval-harness's multiple-choice tasks do: the model's answer is the option whose
continuation of the prompt it finds most likely; no text is generated.

Tokens: the prompt is tokenised with the tokenizer's special tokens and each option (or
reference) without, exactly as a training example is built (core.sft.build_example), so the
option the model was trained to write is the one scored. No EOS is appended.

    log p(option | prompt) = sum over the option's tokens t_j of log p(t_j | prompt, t_<j)

Normalisation (`choose`): "sum" ranks options by that sum (lm-eval's `acc`); "mean" by the
sum divided by the option's token count (a length-normalised variant); "char" by the sum
divided by the option's length in characters (lm-eval's `acc_norm`, which does not depend on
the tokenizer; the general-ability sets report it). Sum and mean agree when every option is
one token (SST-2's label words, the A-D letters); AG News's "Sci/Tech" is three tokens on
SmolLM2's tokenizer, the other labels one.

Cost (`option_logprobs`): one forward of the prompts (left-padded, explicit positions) gives
every option's first token from the next-token distribution at the last position; options
of several tokens feed only their remaining tokens on the prompts' cached keys and values,
one batch per option position (the k-th option of every prompt, right-padded). So a prompt
is read once however many options it has, whether the options are a fixed label set or each
record's own texts (ARC, PIQA, HellaSwag). A reference (`continuation_logprobs`)
is one right-padded forward of prompt + reference. The LM head is applied only where a
token is scored, not to every position (its [batch, length, vocab] output is the largest
tensor of a forward).
"""

from __future__ import annotations

from typing import Sequence

import torch

NORMALIZATIONS = ("sum", "mean", "char")


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

    One forward of the contexts gives every option's first token (the next-token
    distribution at each context's last position). Options of more tokens then continue
    from the contexts' cached keys and values: all contexts that share the option's tokens
    feed its remaining tokens at once (a few positions each), so a prompt is read once
    however many options it has."""
    if any(not c for c in contexts):
        raise ValueError("every context needs at least one token: a causal LM never predicts position 0")
    out: list[list[list[float]]] = []
    for start in range(0, len(contexts), max_rows):
        out.extend(_options_of_chunk(lm, contexts[start:start + max_rows], options[start:start + max_rows], pad_id,
                                     device))
    return out


def _options_of_chunk(lm, contexts, options, pad_id: int, device) -> list[list[list[float]]]:
    decoder, head = _decoder_and_head(lm)
    width = max(len(c) for c in contexts)
    # left-padded, with explicit positions 0..n-1 of the real tokens, so that every row's
    # last context token sits at the same column and continuations append after it
    ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for b, c in enumerate(contexts):
        ids[b, width - len(c):] = torch.tensor(list(c), dtype=torch.long)
        mask[b, width - len(c):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    result = [[[] for _ in opts] for opts in options]
    with torch.inference_mode():
        first = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = getattr(first, "cache", None) or first.past_key_values
        logp = torch.log_softmax(head(first.last_hidden_state[:, -1]).float(), dim=-1)
        for b, opts in enumerate(options):
            for k, o in enumerate(opts):
                result[b][k].append(float(logp[b, o[0]]))
        # the tails of multi-token options, fed on the contexts' cache: one batch per option
        # position k (the rows whose k-th option has more than one token), right-padded to the
        # longest tail; a causal model's real tokens never see the padding after them, and a
        # fixed label set (the same k-th option in every row) needs none
        for k in range(max(len(opts) for opts in options)):
            where = [b for b, opts in enumerate(options) if k < len(opts) and len(opts[k]) > 1]
            if not where:
                continue
            tails = [list(options[b][k]) for b in where]
            width = max(len(t) for t in tails) - 1  # every token but the last is fed
            feed = torch.full((len(where), width), pad_id, dtype=torch.long)
            feed_mask = torch.zeros((len(where), width), dtype=torch.long)
            for r, t in enumerate(tails):
                feed[r, :len(t) - 1] = torch.tensor(t[:-1], dtype=torch.long)
                feed_mask[r, :len(t) - 1] = 1
            rows = torch.tensor(where, device=device)
            feed, feed_mask = feed.to(device), feed_mask.to(device)
            step_mask = torch.cat([mask[rows], feed_mask], dim=1)
            step_pos = pos[rows, -1:] + 1 + torch.arange(width, device=device)
            sub = _select_cache(cache, rows)
            h = decoder(input_ids=feed, attention_mask=step_mask, position_ids=step_pos, use_cache=True,
                        **{_cache_argument(decoder): sub}).last_hidden_state
            # the LM head only where a token is scored: fed position j predicts tail token j + 1
            at = [(r, j) for r, t in enumerate(tails) for j in range(len(t) - 1)]
            ri = torch.tensor([r for r, _ in at], device=h.device)
            ji = torch.tensor([j for _, j in at], device=h.device)
            lp = torch.log_softmax(head(h[ri, ji]).float(), dim=-1)
            target = torch.tensor([t[j + 1] for r, t in enumerate(tails) for j in range(len(t) - 1)], device=lp.device)
            picked = lp[torch.arange(len(at), device=lp.device), target].cpu().tolist()
            i = 0
            for b, t in zip(where, tails):
                result[b][k].extend(picked[i:i + len(t) - 1])
                i += len(t) - 1
    return result


def _cache_argument(decoder) -> str:
    """The name a decoder's forward takes a key/value cache by: `cache` on transformers >= 5.24
    (`past_key_values`, its older name, is deprecated there), else `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _select_cache(cache, rows: torch.Tensor):
    """A copy of the contexts' key/value cache for `rows` (a fresh copy per option: feeding
    an option appends to the cache it is given)."""
    import copy

    sub = copy.deepcopy(cache)
    sub.batch_select_indices(rows)
    return sub


def choose(token_logprobs: Sequence[Sequence[float]], normalization: str = "sum",
           chars: Sequence[int] | None = None) -> int:
    """The index of the most likely option (the first on a tie): by the sum of its tokens'
    log-probabilities, by their mean, or ("char") by the sum over the option's length in
    characters, `chars[i]` (lm-eval's acc_norm: the option text without its delimiter)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}: use {' or '.join(NORMALIZATIONS)}")
    if not token_logprobs or any(len(t) == 0 for t in token_logprobs):
        raise ValueError("every option needs at least one token")
    if normalization == "char":
        if chars is None or len(chars) != len(token_logprobs) or any(c <= 0 for c in chars):
            raise ValueError(f"per-character normalisation needs a positive length per option, got {chars!r}")
        scores = [sum(t) / c for t, c in zip(token_logprobs, chars)]
    else:
        scores = [sum(t) / (len(t) if normalization == "mean" else 1) for t in token_logprobs]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
