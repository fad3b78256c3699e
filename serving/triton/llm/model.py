"""Triton Python-backend model: greedy text generation on ONNX Runtime GenAI (KV cache).

Runs inside Triton's Python backend stub, whose environment has only numpy<2, onnxruntime,
onnxruntime-genai and tokenizers: no torch, no transformers, no tuneship. The decoding rule
is a line-for-line mirror of `tuneship.generate` (prompt encoded with special tokens, greedy
argmax of the last position, stop at eos / newline / max tokens, completion cut before the
newline), so what evaluation measured is what production serves. ONNX Runtime GenAI keeps the
attention keys and values between steps, so each new token costs one position, not the whole
sequence. The generator is a plain class so the compile step's parity check runs it in the
main environment without Triton.

Version directory layout: model.onnx + model.onnx.data + genai_config.json (the ONNX Runtime
GenAI model builder's output), tokenizer.json (the HF tokenizer: ONNX Runtime GenAI's own
tokenizer does not add the BOS the eager tokenizer adds, so prompts are encoded with
`tokenizers`), generation.json, deployment.json.

A shared base with LoRA slots (`tuneship.lora_delta`) adds adapters/<name>.onnx_adapter (and
lora_slots.json): each adapter is loaded once at start-up with ONNX Runtime GenAI's Adapters
API over the one loaded base, and a request's optional ADAPTER input names the one its
generator activates (`set_active_adapter`) before the prompt pass. Requests for different
adapters may follow each other on one instance: each has its own `og.Generator`. No ADAPTER
(or an empty one) is the base model alone; a name not loaded is that request's error. A
merged model directory has no adapters/, so nothing of this runs for it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"


class UnknownAdapterError(KeyError):
    """A request named an adapter this model has not loaded (its message names those it has)."""

    def __str__(self) -> str:  # KeyError's own str() would quote the whole message
        return str(self.args[0])


class GenaiGreedyGenerator:
    """Greedy decoder over an ONNX Runtime GenAI model directory; one `og.Generator` (its own
    KV cache) per request over one shared `og.Model` (weights loaded once). A shared base's
    LoRA adapters (`adapters/*.onnx_adapter`) are loaded once too; a request names the one it
    wants (`adapter`; None or "": the base alone)."""

    def __init__(self, model_dir: str, threads: int = 1) -> None:
        import onnxruntime_genai as og

        self.model_dir = model_dir
        with open(os.path.join(model_dir, "generation.json"), encoding="utf-8") as f:
            self.generation: dict[str, Any] = json.load(f)
        self.eos_id = int(self.generation["eos_token_id"])
        self.default_max_tokens = int(self.generation.get("max_new_tokens", 16))
        self.max_tokens_limit = int(self.generation.get("max_tokens_limit", 256))
        self.max_context = int(self.generation.get("max_context", 4096))
        cfg = og.Config(model_dir)
        # Threads per request's forward pass; Triton scales out with model instances.
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": int(threads), "inter_op_num_threads": 1}}}}))
        self._og = og
        self.model = og.Model(cfg)
        self.tokenizer = self._load_tokenizer()
        self.adapters: Any = None  # og.Adapters, made with the first adapter loaded
        self.loaded: dict[str, str] = {}  # adapter name -> file
        folder = os.path.join(model_dir, ADAPTERS_DIR)
        if os.path.isdir(folder):
            for file in sorted(os.listdir(folder)):
                if file.endswith(ADAPTER_SUFFIX):
                    self.load_adapter(file[: -len(ADAPTER_SUFFIX)], os.path.join(folder, file))

    def _load_tokenizer(self) -> Any:
        """The tokenizer prompts are encoded and answers decoded with: the model's own
        (`tokenizers`, tokenizer.json), which adds the special tokens eager encoding adds. (The
        edge package, with ONNX Runtime GenAI alone, puts its tokenizer here instead.)"""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(os.path.join(self.model_dir, "tokenizer.json"))

    def load_adapter(self, name: str, path: str) -> None:
        """Load an `.onnx_adapter` file under `name` (the base model is not reloaded)."""
        if self.adapters is None:
            self.adapters = self._og.Adapters(self.model)
        self.adapters.load(str(path), name)
        self.loaded[name] = str(path)

    def unload_adapter(self, name: str) -> None:
        self.adapters.unload(name)
        del self.loaded[name]

    def _adapter(self, adapter: str | None) -> str | None:
        """The adapter a request asked for (None: the base alone), or UnknownAdapterError."""
        if not adapter:
            return None
        if adapter not in self.loaded:
            raise UnknownAdapterError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.loaded)})")
        return adapter

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids, special tokens included (as eager generation encodes them)."""
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def _generator(self, prompt_ids: list[int], max_tokens: int, adapter: str | None = None) -> Any:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_tokens)
        generator = self._og.Generator(self.model, params)
        self._before_prompt(generator, self._adapter(adapter))
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        return generator

    def _before_prompt(self, generator: Any, adapter: str | None) -> None:
        """What a request sets on its generator before the prompt pass: its LoRA adapter, if
        it names one (this generator only; other requests' generators keep theirs)."""
        if adapter is not None:
            generator.set_active_adapter(self.adapters, adapter)

    def prompt_logits(self, prompt_ids: list[int], adapter: str | None = None) -> np.ndarray:
        """Logits [prompt_len, vocab] of the prompt pass (what the first token is chosen from);
        the compile step compares them with eager PyTorch's."""
        generator = self._generator(prompt_ids, 1, adapter)
        return np.asarray(generator.get_output("logits"))[0]

    def _decode(self, ids: list[int]) -> tuple[str, bool]:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if "\n" in text:
            return text.split("\n", 1)[0], True
        return text, False

    def _steps(self, prompt: str, max_tokens: int | None,
               adapter: str | None = None) -> Iterator[tuple[str, int, int, float | None]]:
        """The decoding loop: (completion text so far, prompt_tokens, completion_tokens,
        confidence), first before any token, then after each generated token until a stop.

        The confidence is the geometric mean of the probabilities the model gave the tokens it
        chose (the eos that ended the answer included), None before the first: the eval
        suites' `mean_token` rule (`tuneship.evaluate.token_confidence`), which the drift
        monitor holds against users' feedback. Greedy decoding picks the argmax of the logits
        `generate_next_token` computed, which stay readable until the next call; their
        log-softmax at the chosen token is the token's log-probability."""
        adapter = self._adapter(adapter)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("PROMPT must be a non-empty UTF-8 string")
        max_tokens = self.default_max_tokens if max_tokens is None else int(max_tokens)
        if not 0 < max_tokens <= self.max_tokens_limit:
            raise ValueError(f"MAX_TOKENS must be within 1..{self.max_tokens_limit}, got {max_tokens}")
        prompt_ids = self.encode(prompt)
        if len(prompt_ids) + max_tokens > self.max_context:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens; with MAX_TOKENS={max_tokens} it exceeds the "
                f"model context of {self.max_context}"
            )
        generator = self._generator(prompt_ids, max_tokens, adapter)
        out: list[int] = []
        logprob, chosen = 0.0, 0
        yield "", len(prompt_ids), 0, None
        for _ in range(max_tokens):
            generator.generate_next_token()  # greedy: argmax of the last position's logits
            nxt = int(generator.get_next_tokens()[0])
            logprob += _token_logprob(generator.get_output("logits"), nxt)
            chosen += 1
            if nxt == self.eos_id:  # the answer's last token: its text is out, its probability counts
                yield self._decode(out)[0], len(prompt_ids), len(out), math.exp(logprob / chosen)
                break
            out.append(nxt)
            text, hit_newline = self._decode(out)
            yield text, len(prompt_ids), len(out), math.exp(logprob / chosen)
            if hit_newline:
                break

    def generate(self, prompt: str, max_tokens: int | None = None,
                 adapter: str | None = None) -> tuple[str, int, int]:
        """(completion text, prompt_tokens, completion_tokens) for one prompt."""
        return self.answer(prompt, max_tokens, adapter)[:3]

    def answer(self, prompt: str, max_tokens: int | None = None,
               adapter: str | None = None) -> tuple[str, int, int, float | None]:
        """`generate` and the answer's confidence (`_steps`); None when no token was decoded."""
        *_, last = self._steps(prompt, max_tokens, adapter)  # the state after the last token
        return last

    def stream(self, prompt: str, max_tokens: int | None = None,
               adapter: str | None = None) -> Iterator[tuple[str, int, int]]:
        """The same completion as `generate`, as (new text, prompt_tokens, completion_tokens)
        pieces while it is decoded; the last piece (possibly empty) carries the totals.

        A piece goes out once the decoded text has grown and still extends what was sent; text
        ending in U+FFFD (an incomplete UTF-8 sequence of a byte-level token) is held back until
        the next token completes it. The pieces concatenate to `generate`'s text.
        """
        for piece in self.stream_scored(prompt, max_tokens, adapter):
            yield piece[:3]

    def stream_scored(self, prompt: str, max_tokens: int | None = None,
                      adapter: str | None = None) -> Iterator[tuple[str, int, int, float | None]]:
        """`stream`'s pieces with the confidence so far; the last piece carries the answer's."""
        sent = ""
        text, n_prompt, n_out, conf = "", 0, 0, None
        for text, n_prompt, n_out, conf in self._steps(prompt, max_tokens, adapter):
            if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                yield text[len(sent):], n_prompt, n_out, conf
                sent = text
        yield (text[len(sent):] if text.startswith(sent) else ""), n_prompt, n_out, conf


def _token_logprob(logits: Any, token: int) -> float:
    """log softmax(logits)[token] of the last position's logits (any leading dims)."""
    arr = np.asarray(logits)
    row = arr.reshape(-1, arr.shape[-1])[-1].astype(np.float64)  # the prompt pass returns every position
    top = row.max()
    return float(row[token] - top - np.log(np.exp(row - top).sum()))


def _scalar(tensor: Any) -> Any:
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise ValueError(f"expected one element, got shape {tensor.as_numpy().shape}")
    return value[0]


def _response(pb_utils: Any, text: str, n_prompt: int, n_completion: int, confidence: float | None = None,
              with_confidence: bool = False) -> Any:
    """One response; CONFIDENCE (FP32 [1]) only where the model's config declares it (a
    package built before it existed does not) and a token was chosen (JSON has no NaN)."""
    tensors = [
        pb_utils.Tensor("COMPLETION", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("PROMPT_TOKENS", np.array([n_prompt], dtype=np.int32)),
        pb_utils.Tensor("COMPLETION_TOKENS", np.array([n_completion], dtype=np.int32)),
    ]
    if with_confidence and confidence is not None:
        tensors.append(pb_utils.Tensor("CONFIDENCE", np.array([confidence], dtype=np.float32)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def _error(pb_utils: Any, e: Exception) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))


class TritonPythonModel:
    """Triton entry points: the model loaded once per instance, a fresh generator (its own KV
    cache) per request, per-request errors as responses. An instance runs its requests one
    after another; config.pbtxt asks for two instances so a second request is not held up.

    Deployed decoupled (config.pbtxt `model_transaction_policy`): a request with STREAM true
    gets one response per decoded piece of text as it is generated (Triton's
    `generate_stream` endpoint relays them as server-sent events), the last one flagged
    final; without STREAM, one final response with the whole completion (`generate`).
    A non-decoupled config (older packages) gets the one-response-per-request behaviour.
    """

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        model_dir = os.path.join(args["model_repository"], args["model_version"])
        threads = int(os.environ.get("TUNESHIP_ORT_THREADS", "1"))
        self.generator = GenaiGreedyGenerator(model_dir, threads=threads)
        with open(os.path.join(model_dir, "deployment.json"), encoding="utf-8") as f:
            self.deployment = json.load(f)
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.confidence = any(o.get("name") == "CONFIDENCE" for o in config.get("output", []))

    @staticmethod
    def _inputs(request: Any, pb_utils: Any) -> tuple[str, int | None, bool, str | None]:
        raw = _scalar(pb_utils.get_input_tensor_by_name(request, "PROMPT"))
        prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        mt = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
        st = pb_utils.get_input_tensor_by_name(request, "STREAM")
        ad = pb_utils.get_input_tensor_by_name(request, "ADAPTER")  # a shared base's LoRA adapter
        adapter = _scalar(ad) if ad is not None else None
        return (prompt, (int(_scalar(mt)) if mt is not None else None),
                bool(_scalar(st)) if st is not None else False,
                adapter.decode("utf-8") if isinstance(adapter, bytes) else adapter)

    def execute(self, requests: list[Any]) -> list[Any] | None:
        import triton_python_backend_utils as pb_utils

        if self.decoupled:
            for request in requests:
                self._execute_decoupled(request, pb_utils)
            return None
        responses = []
        for request in requests:
            try:
                prompt, max_tokens, _, adapter = self._inputs(request, pb_utils)
                responses.append(_response(pb_utils, *self.generator.answer(prompt, max_tokens, adapter),
                                           with_confidence=self.confidence))
            except Exception as e:  # noqa: BLE001 - one bad request must not take the model down
                responses.append(_error(pb_utils, e))
        return responses

    def _execute_decoupled(self, request: Any, pb_utils: Any) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt, max_tokens, stream, adapter = self._inputs(request, pb_utils)
            scored = self.confidence
            if not stream:
                sender.send(_response(pb_utils, *self.generator.answer(prompt, max_tokens, adapter),
                                      with_confidence=scored), flags=final)
                return
            pieces = self.generator.stream_scored(prompt, max_tokens, adapter)
            held = next(pieces)  # one piece held back, so the last one sent carries the final flag
            for piece in pieces:
                sender.send(_response(pb_utils, *held, with_confidence=scored))
                held = piece
            sender.send(_response(pb_utils, *held, with_confidence=scored), flags=final)
        except Exception as e:  # noqa: BLE001 - one bad request must not take the model down
            sender.send(_error(pb_utils, e), flags=final)

    def finalize(self) -> None:
        self.generator = None  # type: ignore[assignment]
