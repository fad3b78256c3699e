"""Triton Python-backend model: greedy text generation over an ONNX causal LM.

Runs inside Triton's Python backend stub, whose environment has only numpy<2, onnxruntime and
tokenizers: no torch, no transformers, no tuneship. The decoding rule is a line-for-line
mirror of `tuneship.generate` (prompt encoded with special tokens, full-sequence forward,
argmax of the last position, stop at eos / newline / max tokens, completion cut before the
newline), so what evaluation measured is what production serves. The generator is a plain
class so the parity test runs it in the main environment without Triton.

Version directory layout: model.onnx, tokenizer.json, generation.json, deployment.json.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


class OnnxGreedyGenerator:
    """Greedy decoder over model.onnx (input_ids [batch, seq] -> logits [batch, seq, vocab])."""

    def __init__(self, model_dir: str, threads: int = 1) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = model_dir
        with open(os.path.join(model_dir, "generation.json"), encoding="utf-8") as f:
            self.generation: dict[str, Any] = json.load(f)
        self.eos_id = int(self.generation["eos_token_id"])
        self.default_max_tokens = int(self.generation.get("max_new_tokens", 16))
        self.max_tokens_limit = int(self.generation.get("max_tokens_limit", 256))
        self.max_context = int(self.generation.get("max_context", 4096))
        self.tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            os.path.join(model_dir, "model.onnx"), sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
        self.input_name = self.session.get_inputs()[0].name

    def _decode(self, ids: list[int]) -> tuple[str, bool]:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if "\n" in text:
            return text.split("\n", 1)[0], True
        return text, False

    def generate(self, prompt: str, max_tokens: int | None = None) -> tuple[str, int, int]:
        """(completion text, prompt_tokens, completion_tokens) for one prompt."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("PROMPT must be a non-empty UTF-8 string")
        max_tokens = self.default_max_tokens if max_tokens is None else int(max_tokens)
        if not 0 < max_tokens <= self.max_tokens_limit:
            raise ValueError(f"MAX_TOKENS must be within 1..{self.max_tokens_limit}, got {max_tokens}")
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True).ids
        if len(prompt_ids) + max_tokens > self.max_context:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens; with MAX_TOKENS={max_tokens} it exceeds the "
                f"model context of {self.max_context}"
            )
        ids = list(prompt_ids)
        out: list[int] = []
        text = ""
        for _ in range(max_tokens):
            logits = self.session.run(None, {self.input_name: np.asarray([ids], dtype=np.int64)})[0]
            nxt = int(np.argmax(logits[0, -1]))
            if nxt == self.eos_id:
                break
            out.append(nxt)
            ids.append(nxt)
            text, hit_newline = self._decode(out)
            if hit_newline:
                break
        return text, len(prompt_ids), len(out)


def _scalar(tensor: Any) -> Any:
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise ValueError(f"expected one element, got shape {tensor.as_numpy().shape}")
    return value[0]


class TritonPythonModel:
    """Triton entry points; one generator per model instance, per-request errors as responses."""

    def initialize(self, args: dict[str, str]) -> None:
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(os.environ.get("TUNESHIP_ORT_THREADS", "1"))
        self.generator = OnnxGreedyGenerator(model_dir, threads=threads)
        with open(os.path.join(model_dir, "deployment.json"), encoding="utf-8") as f:
            self.deployment = json.load(f)

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                raw = _scalar(pb_utils.get_input_tensor_by_name(request, "PROMPT"))
                prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                mt = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
                max_tokens = int(_scalar(mt)) if mt is not None else None
                text, n_prompt, n_completion = self.generator.generate(prompt, max_tokens)
                responses.append(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("COMPLETION", np.array([text.encode("utf-8")], dtype=np.object_)),
                    pb_utils.Tensor("PROMPT_TOKENS", np.array([n_prompt], dtype=np.int32)),
                    pb_utils.Tensor("COMPLETION_TOKENS", np.array([n_completion], dtype=np.int32)),
                ]))
            except Exception as e:  # noqa: BLE001 - one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{type(e).__name__}: {e}")
                ))
        return responses

    def finalize(self) -> None:
        self.generator = None  # type: ignore[assignment]
