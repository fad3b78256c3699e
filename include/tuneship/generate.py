"""Greedy generation: the one decoding rule evaluation and serving agree on.

Evaluation scores a model by what this function returns, and the Triton model
(serving/triton/llm/model.py) re-implements exactly this rule on ONNX Runtime, so a gate
passed here means the same strings in production. The rule: encode the prompt with the
tokenizer's special tokens, run the model (with its KV cache; the parity check runs it
without, like the ONNX graph), take the argmax of the last position, stop at eos, at a newline in the decoded completion, or
after max_new_tokens; return the completion text only (cut before the newline).

Chat prompts (a list of messages, or any prompt with `prompt_format="chat"`) are rendered
here, in `render_prompt`, with the tokenizer's chat template exactly as training renders a
chat row's prompt (`tuneship.train.trainer.split_prompt_completion`), so eval scores the
model on the very text it learned from.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

Prompt = str | list[dict[str, str]]
PromptFormat = Literal["plain", "chat"]


def render_prompt(tokenizer: Any, prompt: Prompt, prompt_format: PromptFormat = "plain") -> tuple[str, bool]:
    """(text to encode, add_special_tokens). A plain string stays as it is and the tokenizer
    adds its special tokens; chat messages (a list, or a string taken as one user message when
    `prompt_format` is "chat") go through the chat template, whose text already holds them."""
    if prompt_format not in ("plain", "chat"):
        raise ValueError(f"prompt_format must be 'plain' or 'chat', got {prompt_format!r}")
    if isinstance(prompt, str):
        if prompt_format == "plain":
            return prompt, True
        prompt = [{"role": "user", "content": prompt}]
    if not prompt or prompt[-1].get("role") == "assistant":
        raise ValueError("a chat prompt must end with a user message: there is nothing to answer")
    from tuneship.train.trainer import split_prompt_completion

    text, _completion, templated = split_prompt_completion(
        {"messages": [*prompt, {"role": "assistant", "content": ""}]}, tokenizer)
    return text, not templated


def prompt_ids(tokenizer: Any, prompt: Prompt, prompt_format: PromptFormat = "plain") -> list[int]:
    """The token ids generation feeds for a prompt (text, or chat messages)."""
    text, add_special = render_prompt(tokenizer, prompt, prompt_format)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


def completion_text(tokenizer: Any, ids: list[int]) -> tuple[str, bool]:
    """Decode completion ids; (text cut before the first newline, whether a newline was hit)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\n" in text:
        return text.split("\n", 1)[0], True
    return text, False


def generate_ids(
    model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int = 16, prompt_format: PromptFormat = "plain",
    *, kv_cache: bool = True,
) -> tuple[str, int, int]:
    """Greedy-decode one prompt; (completion, prompt_tokens, completion_tokens).

    `kv_cache`: feed only the new token after the first step, reusing the attention keys and
    values (what a served model does; several times faster). The compile step's parity check
    turns it off to compare with a graph that recomputes the whole sequence, so the two run
    the very same arithmetic."""
    import torch

    ids_in = prompt_ids(tokenizer, prompt, prompt_format)
    eos = tokenizer.eos_token_id
    ids = list(ids_in)
    out: list[int] = []
    text = ""
    past = None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if kv_cache:
                feed = ids if past is None else ids[-1:]
                result = model(input_ids=torch.tensor([feed], dtype=torch.long), past_key_values=past, use_cache=True)
                past = result.past_key_values
                logits = result.logits
            else:
                logits = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits
            nxt = int(torch.argmax(logits[0, -1]).item())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
            text, hit_newline = completion_text(tokenizer, out)
            if hit_newline:
                break
    return text, len(ids_in), len(out)


def generate(model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int = 16,
             prompt_format: PromptFormat = "plain", *, batch_size: int = 8,
             progress: Any = None) -> list[str]:
    """Greedy completions for prompts (deterministic; model switched to eval mode). A prompt
    is a string or chat messages; see `render_prompt` for how each is encoded.

    `batch_size` > 1 decodes that many prompts at once (left-padded, through transformers'
    `generate` with the same stops): on CPU a batch of 8 costs little more per token than one
    prompt, as decoding a small model is bound by reading its weights. The rule is the same;
    the arithmetic is not bit-identical to one-at-a-time decoding, so an answer can differ
    where two tokens are within rounding of each other (`python -m bench eval` counts them).
    `batch_size=1` is `generate_ids`, the loop the served model re-implements.
    `progress(done, total)`: called after each batch."""
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), max(batch_size, 1)):
        chunk = prompts[start:start + max(batch_size, 1)]
        if batch_size <= 1 or len(chunk) == 1:
            out += [generate_ids(model, tokenizer, p, max_new_tokens, prompt_format)[0] for p in chunk]
        else:
            out += _generate_batch(model, tokenizer, chunk, max_new_tokens, prompt_format)
        if progress is not None:
            progress(len(out), len(prompts))
    return out


def _generate_batch(model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int,
                    prompt_format: PromptFormat) -> list[str]:
    """One left-padded batch through `model.generate` (greedy), stopping each row at eos or at
    a newline in its decoded completion, as `generate_ids` does."""
    import torch
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    rows = [prompt_ids(tokenizer, p, prompt_format) for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)

    class NewlineInCompletion(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.tensor([completion_text(tokenizer, row[width:].tolist())[1] for row in input_ids],
                                dtype=torch.bool, device=input_ids.device)

    with torch.inference_mode():
        # a config of its own: nothing from the model's generation_config.json (sampling,
        # penalties) changes the rule
        rule = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        seqs = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=rule,
                              stopping_criteria=StoppingCriteriaList([NewlineInCompletion()]))
    texts = []
    for row in seqs[:, width:].tolist():
        ids = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        texts.append(completion_text(tokenizer, ids)[0])
    return texts


def _answer_row(prompt: Prompt, answer: str, prompt_format: PromptFormat) -> dict[str, Any]:
    """A prompt and its answer as a training row (prompt/completion, or chat messages)."""
    if isinstance(prompt, str) and prompt_format == "plain":
        return {"prompt": prompt, "completion": answer}
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return {"messages": [*messages, {"role": "assistant", "content": answer}]}


def loglikelihood(model: Any, tokenizer: Any, prompts: list[Prompt], references: list[str],
                  prompt_format: PromptFormat = "plain", *, batch_size: int = 8) -> list[tuple[float, int]]:
    """Teacher-forced log-likelihood of each reference answer after its prompt, as
    lm-evaluation-harness's loglikelihood requests: (sum of the answer tokens'
    log-probabilities in nats, number of answer tokens). A row is encoded exactly as training
    encodes it (`tuneship.train.trainer.encode_rows`: the prompt, or the chat template's
    rendering of the messages, then the answer and eos), so this is the quantity the
    fine-tune minimised, on held-out rows. Batches are right-padded with an attention mask."""
    import torch

    from tuneship.train.trainer import encode_rows

    if len(prompts) != len(references):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    rows = []
    for prompt, reference in zip(prompts, references, strict=True):
        rows.append(_answer_row(prompt, reference, prompt_format))
    examples, _ = encode_rows(rows, tokenizer, max_seq_len=1 << 20)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[tuple[float, int]] = []
    model.eval()
    step = max(batch_size, 1)
    with torch.inference_mode():
        for start in range(0, len(examples), step):
            chunk = examples[start:start + step]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in chunk], dtype=torch.long)
            mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in chunk],
                                dtype=torch.long)
            labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in chunk], dtype=torch.long)
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            target = labels[:, 1:]
            picked = logprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scored = target != -100
            for row in range(len(chunk)):
                out.append((float(picked[row][scored[row]].sum()), int(scored[row].sum())))
    return out


def option_logliks(model: Any, tokenizer: Any, prompts: list[Prompt], options: list[str],
                   prompt_format: PromptFormat = "plain", *, references: list[str] | None = None,
                   batch_size: int = 8) -> tuple[list[list[float]], list[tuple[float, int]] | None]:
    """For each prompt, the summed log-likelihood (nats) of each option's text as the answer's
    continuation, teacher-forced: the scores a closed set of labels is ranked and calibrated by
    (lm-evaluation-harness's multiple-choice requests). A prompt and option are encoded as
    training encodes a row (`tuneship.train.trainer.encode_rows`: prompt and answer tokenized
    apart), without what ends the answer (eos, a chat turn's end), so an option may be the
    answer's first words (` category=billing`) and scores the probability of every answer that
    starts so. Each prompt runs once (`batch_size` prompts at a time, left-padded); its attention
    cache is shared by its options, which run together in one batch.

    `references` (one per prompt): each prompt's reference answer is scored in the same batch,
    as `loglikelihood` scores it (the whole answer, its end and eos), so a suite that reads both
    pays for each prompt once. Returns (option sums per prompt, reference (sum, tokens) per
    prompt or None)."""
    if not options:
        raise ValueError("option_logliks needs at least one option")
    got = generate_and_score(model, tokenizer, prompts, 0, options, prompt_format, references=references,
                             batch_size=batch_size)
    scores, refs = got.options, got.references
    return scores, refs


class Scored(NamedTuple):
    answers: list[str]  # greedy, `generate`'s rule
    options: list[list[float]]  # per prompt, each option's summed log-likelihood
    references: list[tuple[float, int]] | None  # per prompt, its reference's (sum, tokens)
    # per prompt, the log-probability of each token of its greedy answer as it was chosen (the
    # eos that ended it included): what a token-level confidence rule reads
    answer_logprobs: list[list[float]]


def generate_and_score(model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int,
                       options: list[str], prompt_format: PromptFormat = "plain", *,
                       references: list[str] | None = None, batch_size: int = 16, progress: Any = None,
                       ) -> Scored:
    """`generate`'s greedy answers (when max_new_tokens > 0) and `option_logliks`' scores from
    ONE run of each prompt: the prompts are encoded once, batched left-padded, and their
    attention cache first decodes the answers greedily (the rule of `generate_ids`: eos, a
    newline in the completion, or max_new_tokens ends a row), then is cut back to the prompts
    and shared by the options and the reference. The answers' own token log-probabilities come
    with them (the softmax of the logits greedy decoding reads anyway). `progress(done, total)`
    after each batch."""
    import torch

    from tuneship.train.trainer import split_prompt_completion

    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    k = len(options)
    opt_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    if any(not ids for ids in opt_ids):
        raise ValueError("an option's text is empty: it has no tokens to score")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded: list[tuple[list[int], list[list[int]]]] = []  # per prompt: its ids, its continuations
    for i, prompt in enumerate(prompts):
        answer = "" if references is None else references[i]
        text, completion, templated = split_prompt_completion(_answer_row(prompt, answer, prompt_format), tokenizer)
        conts = list(opt_ids)
        if references is not None:
            conts.append(tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos])
        encoded.append((tokenizer(text, add_special_tokens=not templated)["input_ids"], conts))  # as encode_rows does
    answers: list[str] = []
    answer_logprobs: list[list[float]] = []
    scores: list[list[float]] = []
    refs: list[tuple[float, int]] = []
    model.eval()
    step = max(batch_size, 1)
    with torch.inference_mode():
        for start in range(0, len(encoded), step):
            chunk = encoded[start:start + step]
            plen = [len(p) for p, _ in chunk]
            width = max(plen)
            pmask = torch.tensor([[0] * (width - n) + [1] * n for n in plen], dtype=torch.long)
            first = model(input_ids=torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk], dtype=torch.long),
                          attention_mask=pmask, position_ids=(pmask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                          logits_to_keep=1)
            past, last = first.past_key_values, first.logits[:, -1]
            if max_new_tokens > 0:
                texts, logprobs = _greedy(model, tokenizer, past, last, pmask, plen, max_new_tokens, pad)
                answers += texts
                answer_logprobs += logprobs
                if (extra := past.get_seq_length() - width) > 0:
                    past.crop(-extra)  # back to the prompts, for the continuations
            per = len(chunk[0][1])  # continuations per prompt
            if per:
                past.batch_repeat_interleave(per)
                conts = [c for _, cs in chunk for c in cs]
                cw = max(len(c) for c in conts)
                feed = torch.tensor([c + [pad] * (cw - len(c)) for c in conts], dtype=torch.long)
                cmask = torch.tensor([[1] * len(c) + [0] * (cw - len(c)) for c in conts], dtype=torch.long)
                positions = torch.tensor([[n + j for j in range(cw)] for n in plen for _ in range(per)],
                                         dtype=torch.long)
                rest = model(input_ids=feed, attention_mask=torch.cat([pmask.repeat_interleave(per, 0), cmask], dim=1),
                             position_ids=positions, past_key_values=past, use_cache=False).logits
                # token j of a continuation is predicted by the prompt's last position (j = 0) or by j - 1
                logits = torch.cat([last[:, None].repeat_interleave(per, 0), rest[:, :-1]], dim=1).float()
                logp = torch.log_softmax(logits, dim=-1).gather(-1, feed.unsqueeze(-1)).squeeze(-1)
            for b in range(len(chunk)):
                sums = [float(logp[b * per + j, :len(c)].sum()) for j, c in enumerate(chunk[b][1])] if per else []
                scores.append(sums[:k])
                if references is not None:
                    refs.append((sums[k], len(chunk[b][1][k])))
            if progress is not None:
                progress(len(scores), len(prompts))
    return Scored(answers, scores, refs if references is not None else None,
                  answer_logprobs if max_new_tokens > 0 else [[] for _ in prompts])


def _greedy(model: Any, tokenizer: Any, past: Any, last: Any, pmask: Any, plen: list[int], max_new_tokens: int,
            pad: int) -> tuple[list[str], list[list[float]]]:
    """Greedy decoding of a left-padded batch from its prompts' cache and last logits, each row
    stopped at eos or a newline in its decoded completion (`generate_ids`' rule). Also each
    row's chosen tokens' log-probabilities (its ending eos included)."""
    import torch

    eos = tokenizer.eos_token_id
    rows = len(plen)
    out: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    done = [False] * rows
    mask = pmask
    for step in range(max_new_tokens):
        pick = last.argmax(-1)
        nxt = pick.tolist()
        chosen = torch.log_softmax(last.float(), dim=-1).gather(-1, pick[:, None])[:, 0].tolist()
        for r in range(rows):
            if done[r]:
                continue
            logprobs[r].append(chosen[r])
            if nxt[r] == eos:
                done[r] = True
                continue
            out[r].append(nxt[r])
            if completion_text(tokenizer, out[r])[1] or len(out[r]) >= max_new_tokens:
                done[r] = True
        if all(done) or step == max_new_tokens - 1:
            break
        feed = torch.tensor([[pad if done[r] else nxt[r]] for r in range(rows)], dtype=torch.long)
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        positions = torch.tensor([[n + step] for n in plen], dtype=torch.long)
        last = model(input_ids=feed, attention_mask=mask, position_ids=positions, past_key_values=past,
                     use_cache=True, logits_to_keep=1).logits[:, -1]
    return [completion_text(tokenizer, ids)[0] for ids in out], logprobs
