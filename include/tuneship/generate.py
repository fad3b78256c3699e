"""Greedy generation: the one decoding rule evaluation and serving agree on.

Evaluation scores a model by what this function returns, and the Triton model
(serving/triton/llm/model.py) re-implements exactly this rule on ONNX Runtime, so a gate
passed here means the same strings in production. The rule: encode the prompt with the
tokenizer's special tokens, run the full sequence (no KV cache, like the ONNX graph), take
the argmax of the last position, stop at eos, at a newline in the decoded completion, or
after max_new_tokens; return the completion text only (cut before the newline).
"""

from __future__ import annotations

from typing import Any


def completion_text(tokenizer: Any, ids: list[int]) -> tuple[str, bool]:
    """Decode completion ids; (text cut before the first newline, whether a newline was hit)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if "\n" in text:
        return text.split("\n", 1)[0], True
    return text, False


def generate_ids(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 16
) -> tuple[str, int, int]:
    """Greedy-decode one prompt; (completion, prompt_tokens, completion_tokens)."""
    import torch

    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = list(prompt_ids)
    out: list[int] = []
    text = ""
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits
            nxt = int(torch.argmax(logits[0, -1]).item())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
            text, hit_newline = completion_text(tokenizer, out)
            if hit_newline:
                break
    return text, len(prompt_ids), len(out)


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy completions for prompts (deterministic; model switched to eval mode)."""
    model.eval()
    return [generate_ids(model, tokenizer, p, max_new_tokens)[0] for p in prompts]
