"""The edge package (issue 13): a compiled build a device runs with ONNX Runtime GenAI alone.

`package_edge` turns a compiled version directory (what `tuneship.compile.compile_for_triton`
writes and Triton serves; the edge build is int4) into a directory that needs nothing from
Tuneship, Triton, transformers, torch or `tokenizers`: the ONNX model and its weights,
genai_config.json, the tokenizer files ONNX Runtime GenAI's tokenizer reads, generation.json,
model.py (the very file Triton runs, whose greedy decoding loop the edge reuses), a standalone
`run.py`, edge.json (how prompts are rendered), SHA256SUMS (`sha256sum -c` on the device) and
MANIFEST.json (every file's sha256 and size, the precision, the source version, the
onnxruntime-genai version it was checked with).

Why a package is faithful: ONNX Runtime GenAI's tokenizer adds none of the special tokens the
model's own tokenizer puts around a prompt (the reason model.py encodes with `tokenizers`), so
edge.json records them and `run.py` adds them itself; chat prompts are rendered by ONNX Runtime
GenAI's chat-template engine. Before a package is written, it is loaded the way `run.py`
loads it and must render, encode and answer the check prompts exactly as the served model does
(`compile.served_text` through the class Triton runs), else nothing is written. Written in a
temp directory beside the destination and swapped into place (`atomic.replace_dir`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tarfile
import tempfile
import types
from pathlib import Path
from typing import Any

from tuneship import atomic
from tuneship.basemodel import sha256_file
from tuneship.compile import (
    BUILD_FILES,
    GENERIC_PARITY_PROMPTS,
    PRECISIONS,
    load_triton_model_module,
    model_sha256,
    served_text,
)

FORMAT = "tuneship-edge/1"
MANIFEST = "MANIFEST.json"
SUMS = "SHA256SUMS"
RUNNER = "run.py"
EDGE_CONFIG = "edge.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # ONNX Runtime GenAI's tokenizer will not load without it
# What the package takes from the compiled version directory, unchanged.
SERVED_FILES = (*BUILD_FILES, "tokenizer.json", "generation.json", "model.py")


class EdgeError(RuntimeError):
    """The build cannot be packaged, or a package is incomplete or not what was packaged."""


# The package's runner. It imports only onnxruntime_genai and the standard library (model.py,
# loaded from the package, imports numpy, which onnxruntime-genai itself depends on).
RUN_PY = r'''#!/usr/bin/env python3
"""Answer prompts with this edge package's model, on ONNX Runtime GenAI alone.

    python run.py "Hello"                      # each argument a prompt, one answer a line
    printf 'Hello\nGood morning\n' | python run.py     # no arguments: one prompt a line of stdin
    python run.py --jsonl < prompts.jsonl      # a JSON string or chat messages a line; JSON out

Needs Python and onnxruntime-genai (the version MANIFEST.json names; pip brings its numpy and
onnxruntime). Check the files first with `sha256sum -c SHA256SUMS`.

Answers are the served model's: the decoding is model.py's (the file Triton runs: greedy,
stop at the end-of-sequence token or a newline, the completion cut before it), and a prompt is
rendered as the served model receives it: plain text as it is, or (a chat package, or --format
chat) the model's chat template over the messages, the package's system prompt first when they
have none, less the BOS text the tokenizer adds itself. Written by tuneship.edge.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
EXIT_OK, EXIT_PROMPT, EXIT_PACKAGE = 0, 1, 2


class EdgeError(Exception):
    """The package is incomplete, or a prompt cannot be rendered."""


def _json(package_dir, name):
    with open(os.path.join(package_dir, name), encoding="utf-8") as f:
        return json.load(f)


def check_files(package_dir):
    """MANIFEST.json's files are all here at their sizes (sha256sum -c SHA256SUMS checks content)."""
    if not os.path.isfile(os.path.join(package_dir, "MANIFEST.json")):
        raise EdgeError(f"{package_dir} has no MANIFEST.json: not an edge package, or an incomplete copy of one")
    manifest = _json(package_dir, "MANIFEST.json")
    for name, meta in sorted(manifest["files"].items()):
        path = os.path.join(package_dir, name)
        if not os.path.isfile(path):
            raise EdgeError(f"the edge package in {package_dir} is incomplete: {name} is missing")
        if os.path.getsize(path) != meta["bytes"]:
            raise EdgeError(f"{name} is {os.path.getsize(path)} bytes, MANIFEST.json says {meta['bytes']}: "
                            "a truncated or changed copy (check with: sha256sum -c SHA256SUMS)")
    return manifest


def _served_module(package_dir):
    """model.py, loaded by its path (python -I leaves this directory off sys.path) and without
    writing bytecode into the package."""
    path = os.path.join(package_dir, "model.py")
    module = types.ModuleType("edge_served_model")
    module.__file__ = path
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), module.__dict__)
    return module


class OgTokenizer:
    """The calls model.py makes on a `tokenizers.Tokenizer`, answered by ONNX Runtime GenAI's
    tokenizer: its ids plus the special tokens the model's own tokenizer puts around a prompt
    (ORT GenAI adds none), and text decoded without special tokens."""

    def __init__(self, tokenizer, edge):
        self.og = tokenizer
        self.prefix = [int(i) for i in edge["special_prefix"]]
        self.suffix = [int(i) for i in edge["special_suffix"]]
        self.special = {int(i) for i in edge["special_ids"]}

    def encode(self, text, add_special_tokens=True):
        ids = [int(i) for i in self.og.encode(text)]
        return types.SimpleNamespace(ids=self.prefix + ids + self.suffix if add_special_tokens else ids)

    def decode(self, ids, skip_special_tokens=True):
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special)]
        return self.og.decode(ids) if ids else ""


def load(package_dir=HERE, threads=1):
    """The package's generator, once its files are all here and onnxruntime-genai imports."""
    required = check_files(package_dir)["requires"]["onnxruntime-genai"]
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise EdgeError(f"this package runs on onnxruntime-genai: pip install onnxruntime-genai=={required}") from None
    if og.__version__ != required:
        print(f"warning: packaged and checked with onnxruntime-genai {required}, running on {og.__version__}",
              file=sys.stderr)
    return generator(package_dir, threads)


def generator(package_dir=HERE, threads=1):
    """model.py's GenaiGreedyGenerator with ONNX Runtime GenAI's tokenizer."""
    import onnxruntime_genai as og

    served = _served_module(package_dir)
    if not hasattr(served.GenaiGreedyGenerator, "_load_tokenizer"):
        raise EdgeError("this build's model.py has no tokenizer hook (it predates edge packages): compile the "
                        "version again")

    class EdgeGenerator(served.GenaiGreedyGenerator):
        def _load_tokenizer(self):
            # ONNX Runtime GenAI's tokenizer in place of the `tokenizers` one model.py loads
            self.edge = _json(self.model_dir, "edge.json")
            return OgTokenizer(og.Tokenizer(self.model), self.edge)

        def messages(self, prompt):
            """Chat messages for a prompt (a string is the user's turn), the system prompt first."""
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            system = self.edge.get("system_prompt")
            if system and not any(m.get("role") == "system" for m in messages):
                messages = [{"role": "system", "content": system}] + messages
            if not messages or messages[-1].get("role") == "assistant":
                raise EdgeError("a chat prompt must end with a user message: there is nothing to answer")
            return messages

        def render(self, prompt, prompt_format=None):
            """The text the served model receives for a prompt."""
            prompt_format = prompt_format or self.edge["prompt_format"]
            if prompt_format == "plain":
                if not isinstance(prompt, str):
                    raise EdgeError("chat messages need --format chat")
                return prompt
            template = self.generation.get("chat_template")
            if not template:
                raise EdgeError("this model has no chat template: use --format plain")
            text = self.tokenizer.og.apply_chat_template(json.dumps(self.messages(prompt)), template_str=template,
                                                         add_generation_prompt=True)
            bos = self.generation.get("bos_token") or ""  # "" when the tokenizer adds no BOS itself
            return text[len(bos):] if bos and text.startswith(bos) else text

    return EdgeGenerator(package_dir, threads)


def _prompts(args):
    lines = args.prompts or [line.rstrip("\r\n") for line in sys.stdin]
    return [json.loads(p) if args.jsonl else p for p in lines if p.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Answer prompts with this edge package's model "
                                                 "(ONNX Runtime GenAI, greedy, as the served model answers).")
    parser.add_argument("prompts", nargs="*", help="prompts; none: read from stdin, one a line")
    parser.add_argument("--jsonl", action="store_true",
                        help="each prompt is JSON (a string, or a list of chat messages); each answer a JSON "
                             "line {completion, prompt_tokens, completion_tokens}")
    parser.add_argument("--format", choices=["plain", "chat"], default=None,
                        help="render prompts as plain text or through the chat template (default: the package's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: generation.json's max_new_tokens")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="ONNX Runtime threads")
    args = parser.parse_args(argv)
    try:
        generator = load(HERE, args.threads)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_PACKAGE
    for n, prompt in enumerate(_prompts(args), 1):
        try:
            text, n_prompt, n_out = generator.generate(generator.render(prompt, args.format), args.max_tokens)
        except (EdgeError, ValueError) as e:
            print(f"error: prompt {n}: {e}", file=sys.stderr)
            return EXIT_PROMPT
        print(json.dumps({"completion": text, "prompt_tokens": n_prompt, "completion_tokens": n_out},
                         ensure_ascii=False) if args.jsonl else text, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
'''


def _runner(package_dir: Path) -> types.ModuleType:
    """The package's own run.py as a module (what a device runs), without writing bytecode."""
    path = package_dir / RUNNER
    module = types.ModuleType("tuneship_edge_run")
    module.__file__ = str(path)
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), module.__dict__)
    return module


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def served_tokenizer(version_dir: Path) -> Any:
    """The served model's tokenizer rebuilt from its version directory (tokenizer.json and
    generation.json's tokens and chat template), for `compile.served_text`."""
    from transformers import PreTrainedTokenizerFast

    generation = _read_json(version_dir / "generation.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(version_dir / "tokenizer.json"), clean_up_tokenization_spaces=False)
    names = {k: tok.convert_ids_to_tokens(generation[f"{k}_id"])
             for k in ("bos_token", "eos_token", "pad_token") if generation.get(f"{k}_id") is not None}
    tok.add_special_tokens(names)
    tok.chat_template = generation.get("chat_template")
    return tok


def _tokenizer_files(version_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config.json for ONNX Runtime GenAI's tokenizer, edge.json's token fields).

    The special tokens the served tokenizer's post-processor puts around a text (Llama's BOS)
    are read off an encoding with and without them; ORT GenAI's tokenizer, given no
    `add_bos_token`, adds none, and the package adds them as recorded."""
    from tokenizers import Tokenizer

    generation = _read_json(version_dir / "generation.json")
    tok = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    probe = "a"
    bare, full = tok.encode(probe, add_special_tokens=False).ids, tok.encode(probe, add_special_tokens=True).ids
    at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
    if not bare or at is None:
        raise EdgeError(f"cannot tell the special tokens the served tokenizer adds: {probe!r} encodes as {bare} "
                        f"bare and {full} with them")
    special = sorted(t["id"] for t in _read_json(version_dir / "tokenizer.json").get("added_tokens", [])
                     if t.get("special"))
    names = {k: tok.id_to_token(int(generation[f"{k}_id"]))
             for k in ("bos_token", "eos_token", "pad_token") if generation.get(f"{k}_id") is not None}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                        "model_max_length": int(generation.get("max_context", 4096)), **names}
    return tokenizer_config, {"special_prefix": full[:at], "special_suffix": full[at + len(bare):],
                              "special_ids": special}


def _check(stage: Path, version_dir: Path, tokenizer: Any, prompts: list[Any]) -> dict[str, Any]:
    """The staged package, loaded as run.py loads it, against the served model (the class Triton
    runs) on `prompts`: the rendered text, the token ids and the greedy answer must be equal."""
    edge = _runner(stage).generator(str(stage))
    served = load_triton_model_module().GenaiGreedyGenerator(str(version_dir))
    chat = edge.edge["prompt_format"] == "chat"
    for p in prompts:
        text = edge.render(p)
        expected = served_text(tokenizer, edge.messages(p) if chat else p)
        if text != expected:
            raise EdgeError(f"ONNX Runtime GenAI renders {p!r} as {text!r}, the served model receives "
                            f"{expected!r}: this chat template cannot be packaged for the edge")
        ids, served_ids = edge.encode(text), served.encode(expected)
        if ids != served_ids:
            raise EdgeError(f"ONNX Runtime GenAI's tokenizer encodes {text!r} as {ids}, the served model as "
                            f"{served_ids}: this tokenizer cannot be packaged for the edge")
        got, want = edge.generate(text), served.generate(expected)
        if got != want:
            raise EdgeError(f"the edge package answers {p!r} with {got}, the served model with {want}")
    return {"prompts": len(prompts), "rendered_equal": True, "tokens_equal": True, "answers_equal": True}


def _file_list(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def package_edge(version_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 precision: str | None = "int4", prompt_format: str = "plain", system_prompt: str | None = None,
                 check_prompts: list[Any] | None = None, tokenizer: Any = None,
                 archive: bool = False) -> dict[str, Any]:
    """Write the edge package of a compiled version directory into `out_dir` (replaced whole);
    returns its manifest, with `path` (and `archive`, the .tar.gz beside it, when asked).

    `precision`: what the build must be (None: any). `prompt_format` / `system_prompt`: how
    run.py renders a prompt (the task's). `check_prompts`: what the package must answer exactly
    as the served model does before it is written (client prompts: text, or chat messages;
    default: compile's generic parity prompts). `tokenizer`: the served model's HF tokenizer
    (default: rebuilt from the version's files). `archive`: also OUT.tar.gz beside it (without,
    an earlier one there is removed). Raises EdgeError; nothing is written then."""
    src, out = Path(version_dir), Path(out_dir)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if prompt_format not in ("plain", "chat"):
        raise ValueError(f"prompt_format must be 'plain' or 'chat', got {prompt_format!r}")
    missing = [name for name in SERVED_FILES if not (src / name).is_file()]
    if missing:
        raise EdgeError(f"{src} is not a compiled version directory: {', '.join(missing)} missing")
    source = _read_json(src / "deployment.json") if (src / "deployment.json").is_file() else {}
    built = source.get("precision")
    if precision is not None and built != precision:
        raise EdgeError(f"the build in {src} is {built or 'of unrecorded precision'}, the edge package is {precision}: "
                        f"compile at {precision} (a task's compile.precision; held to its gates), or ask for {built}")
    generation = _read_json(src / "generation.json")
    if prompt_format == "chat" and not generation.get("chat_template"):
        raise EdgeError(f"prompt_format chat, but the model in {src} has no chat template")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        for name in SERVED_FILES:
            shutil.copy2(src / name, stage / name)
        tokenizer_config, tokens = _tokenizer_files(src)
        (stage / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))
        edge = {"format": FORMAT, "prompt_format": prompt_format, "system_prompt": system_prompt, **tokens}
        (stage / EDGE_CONFIG).write_text(json.dumps(edge, indent=2, sort_keys=True))
        (stage / RUNNER).write_text(RUN_PY)
        (stage / RUNNER).chmod(0o755)
        checked = _check(stage, src, tokenizer if tokenizer is not None else served_tokenizer(src),
                         list(check_prompts) if check_prompts else list(GENERIC_PARITY_PROMPTS))
        files = {name: {"sha256": sha256_file(stage / name), "bytes": (stage / name).stat().st_size}
                 for name in _file_list(stage)}
        (stage / SUMS).write_text("".join(f"{meta['sha256']}  {name}\n" for name, meta in files.items()))
        files[SUMS] = {"sha256": sha256_file(stage / SUMS), "bytes": (stage / SUMS).stat().st_size}
        manifest = {
            "format": FORMAT,
            "precision": built,
            "source": source,  # deployment.json: task, registered model and version, base, adapter
            "onnx_sha256": model_sha256(stage),
            "requires": {"onnxruntime-genai": importlib.metadata.version("onnxruntime-genai"),
                         "onnxruntime": importlib.metadata.version("onnxruntime")},
            "run": f"python {RUNNER} PROMPT ...",
            "prompt_format": prompt_format,
            "checked": checked,
            "files": dict(sorted(files.items())),
            "bytes": sum(meta["bytes"] for meta in files.values()),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        stage.chmod(0o755)
        atomic.replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    result = {**manifest, "path": str(out)}
    if archive:
        result["archive"] = str(write_archive(out))
    else:  # an archive left by an earlier packaging would no longer match the package
        out.with_name(f"{out.name}.tar.gz").unlink(missing_ok=True)
    return result


def write_archive(package_dir: Path) -> Path:
    """PACKAGE.tar.gz beside the package (one top-level directory, its name), written atomically."""
    dest = package_dir.with_name(f"{package_dir.name}.tar.gz")
    with atomic.replacing(dest) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(package_dir, arcname=package_dir.name)
        os.chmod(tmp, 0o644)
    return dest


def verify_edge(package_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Every file MANIFEST.json lists is there with its sha256 and size, and nothing else is;
    returns the manifest. Raises EdgeError naming each file that is missing, differs or is extra."""
    root = Path(package_dir)
    if not (root / MANIFEST).is_file():
        raise EdgeError(f"{root} has no {MANIFEST}: not an edge package, or an incomplete copy of one")
    manifest = _read_json(root / MANIFEST)
    problems = []
    for name, meta in sorted(manifest["files"].items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif (size := path.stat().st_size) != meta["bytes"] or (digest := sha256_file(path)) != meta["sha256"]:
            got = f"{size} bytes" if size != meta["bytes"] else f"sha256 {digest}"
            want = f"{meta['bytes']} bytes" if size != meta["bytes"] else f"sha256 {meta['sha256']}"
            problems.append(f"{name} differs from the manifest: {got}, expected {want}")
    extra = [n for n in _file_list(root) if n != MANIFEST and n not in manifest["files"]]
    problems += [f"{n} is not in the manifest" for n in extra]
    if problems:
        raise EdgeError(f"the edge package in {root} is not what was packaged: " + "; ".join(problems))
    return manifest


def package_version(task: Any, version: int, out_dir: str | os.PathLike[str], *, precision: str | None = "int4",
                    archive: bool = False) -> dict[str, Any]:
    """The edge package of a registered version's compiled build (the one `llm_finetune`'s
    compile stage held to the task's gates), rendering prompts as the task's clients send
    them and checked on the task's parity prompts."""
    from tuneship.stages import compiled_dir, parity_prompts

    marker = compiled_dir(task, version) / "COMPILED.json"
    if not marker.is_file():
        raise EdgeError(f"{task.name} v{version} has no compiled build ({marker} is missing): the edge package is "
                        "made from the build llm_finetune's compile stage gated; compile the version first")
    version_dir = Path(_read_json(marker)["onnx_path"]).parent
    return package_edge(version_dir, out_dir, precision=precision, prompt_format=task.prompt_format,
                        system_prompt=task.system_prompt, check_prompts=parity_prompts(task), archive=archive)
