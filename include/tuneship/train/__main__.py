"""Trainer CLI: the one entrypoint the local runner, the container and the GPU pod all call.

    python -m tuneship.train --recipe R.yaml --data DATASET_DIR --base BASE_REF \\
        --output OUT_DIR [--set key=value]...

Exit 0 ok (also when OUT_DIR already holds this exact run), 2 invalid recipe/arguments/data
(one line naming the key or file), 143 stopped by SIGTERM (a checkpoint of the last finished
step was saved first), 1 any other failure. Rerunning after a crash or a stop resumes from
the newest complete checkpoint in OUT_DIR/checkpoints.

SIGTERM is handled, not left to the default: in a pod the trainer is PID 1 (the runner's argv
is the container command), and PID 1 ignores signals it has no handler for, so without one a
deleted or preempted pod would train on until SIGKILL and lose everything since the last
scheduled checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback

from tuneship.train.recipe import RecipeError, load_recipe, parse_override


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuneship.train", description="LoRA fine-tune.")
    p.add_argument("--recipe", required=True, help="YAML recipe (see train/recipes/)")
    p.add_argument("--data", required=True, help="dataset dir with train.jsonl and eval.jsonl")
    p.add_argument("--base", default=None,
                   help="base model directory or HF id (overrides the recipe's base_model)")
    p.add_argument("--output", required=True, help="output dir (adapter, metrics, checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, dotted for nested keys (lora.r=8)")
    return p


def _stop_on_sigterm() -> None:
    from tuneship.train.trainer import STOP

    def handler(signum: int, frame: object) -> None:
        print("SIGTERM received: stopping after the current step", file=sys.stderr, flush=True)
        STOP.set()

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 itself on bad arguments
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        if args.base:
            overrides["base_model"] = args.base
        recipe = load_recipe(args.recipe, overrides)
        from tuneship.train.trainer import DataError, Stopped, train

        try:
            train(recipe, args.data, args.output)
        except DataError as e:
            raise RecipeError(str(e)) from None
        except Stopped as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 128 + signal.SIGTERM
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the pod's exit code is the contract
        traceback.print_exc()
        print(f"error: training failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    _stop_on_sigterm()  # the process's own entrypoint only, never a host that imports main()
    sys.exit(main())
