"""The ``ffkern`` command line: ``ffkern train`` and ``ffkern eval CHECKPOINT``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ffkern.backends import BACKENDS, PRECISIONS
from ffkern.config import MODELS, NEGATIVES, TRAINING, FFConfig
from ffkern.data import DATASETS
from ffkern.reference import OBJECTIVES
from ffkern.variants.augment import AUGMENTS

log = logging.getLogger("ffkern")

# Modules that add sub-commands: each has ``add_cli(subparsers)``, which adds its parser and
# sets ``func`` (a callable taking the parsed arguments and returning an exit code).
EXTRA_COMMAND_MODULES: tuple[str, ...] = ("ffkern.probes",)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1000,1000,1000, got {text!r}"
        ) from None
    return values


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--dataset, --data, --download, --device, --backend, --precision."""
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits")
    p.add_argument("--data", metavar="DIR", help="folder with the dataset's standard files")
    p.add_argument("--download", action="store_true", help="download missing files (online)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="default: auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="triton only")


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Every FFConfig knob as a flag; defaults are Hinton's recipe (see FFConfig)."""
    d = FFConfig()
    p.add_argument("--layers", type=_int_list, default=d.layers, help="e.g. 1000,1000,1000")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=("hinton", "constant"), default=d.schedule)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--goodness", choices=("sum", "mean"), default=d.goodness)
    p.add_argument("--threshold", type=float, default=None, help="default: units (sum) or 1")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--norm", choices=("rms", "l2"), default=d.norm)
    p.add_argument("--peer-strength", type=float, default=d.peer_strength, help="0: off")
    p.add_argument("--objective", choices=OBJECTIVES, default=d.objective)
    p.add_argument("--symba-alpha", type=float, default=d.symba_alpha, help="α of symba")
    p.add_argument(
        "--negatives",
        choices=NEGATIVES,
        default=d.negatives,
        help="hybrid: unsupervised FF (no label input, softmax head on the last 3 layers)",
    )
    p.add_argument("--blur-passes", type=int, help="hybrid mask blur passes (default 6)")
    p.add_argument("--augment", choices=AUGMENTS, default=d.augment)
    p.add_argument("--max-shift", type=int, help="jitter: largest shift in pixels (default 2)")
    p.add_argument("--model", choices=MODELS, default=d.model, help="recurrent: top-down FF")
    p.add_argument("--iterations", type=int, help="recurrent: iterations per run (default 8)")
    p.add_argument("--damping", type=float, help="recurrent: weight of the old state (0.3)")
    p.add_argument("--score-from", type=int, help="recurrent: first scored iteration (3)")
    p.add_argument("--score-to", type=int, help="recurrent: last scored iteration (5)")
    p.add_argument("--training", choices=TRAINING, default=d.training)
    p.add_argument("--no-softmax-head", action="store_true", help="goodness predictor only")
    p.add_argument("--label-scale", type=float, default=d.label_scale)
    p.add_argument("--freeze", type=_int_list, default=(), help="1-based layers kept at init")
    p.add_argument("--train-eval-samples", type=int, default=d.train_eval_samples)


# Variant flags that fill FFConfig.extra when given: flag attribute -> extra key.
_EXTRA_FLAGS = {
    "blur_passes": "hybrid.blur_passes",
    "max_shift": "jitter.max_shift",
    "iterations": "recurrent.iterations",
    "damping": "recurrent.damping",
    "score_from": "recurrent.score_first",
    "score_to": "recurrent.score_last",
}


def config_from_args(args: argparse.Namespace) -> FFConfig:
    """Build the FFConfig that the flags describe (validated)."""
    extra = {
        key: getattr(args, flag)
        for flag, key in _EXTRA_FLAGS.items()
        if getattr(args, flag, None) is not None
    }
    return FFConfig(
        layers=args.layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        seed=args.seed,
        goodness=args.goodness,
        threshold=args.threshold,
        temperature=args.temperature,
        norm=args.norm,
        peer_strength=args.peer_strength,
        objective=args.objective,
        symba_alpha=args.symba_alpha,
        negatives=args.negatives,
        augment=args.augment,
        model=args.model,
        extra=extra,
        training=args.training,
        softmax_head=not args.no_softmax_head,
        label_scale=args.label_scale,
        freeze=args.freeze,
        train_eval_samples=args.train_eval_samples,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ffkern", description="Forward-Forward training with fused kernels."
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a supervised FF network")
    add_data_arguments(train)
    add_config_arguments(train)
    train.add_argument("--metrics", metavar="PATH", help="append one JSON line per epoch")
    train.add_argument("--checkpoint", metavar="PATH", help="write a checkpoint every epoch")
    train.add_argument("--resume", metavar="PATH", help="continue from this checkpoint")
    train.add_argument("--stop-after", type=int, metavar="E", help="stop after epoch E")
    train.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument(
        "--parallel",
        choices=("none", "data", "pipeline"),
        default="none",
        help="scale out with torch.distributed (launch with torchrun)",
    )
    train.add_argument(
        "--dist-timeout",
        type=float,
        metavar="S",
        help="seconds a collective waits for a peer before the job fails "
        "(default: $FFKERN_DIST_TIMEOUT or 120)",
    )

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test set")
    ev.add_argument("checkpoint", metavar="CHECKPOINT")
    add_data_arguments(ev)
    ev.set_defaults(dataset=None)
    ev.add_argument("--json", action="store_true", help="print the result as JSON")

    train.set_defaults(func=cmd_train)
    ev.set_defaults(func=cmd_eval)
    for module in EXTRA_COMMAND_MODULES:
        importlib.import_module(module).add_cli(sub)
    return parser


def run_config(args: argparse.Namespace) -> tuple[FFConfig, str]:
    """The configuration and dataset of the run: the flags', or the ``--resume`` checkpoint's.

    On resume only ``--epochs`` may change the saved configuration; a ``--dataset`` other than
    the checkpoint's is an error.
    """
    if not args.resume:
        return config_from_args(args), args.dataset
    from ffkern.checkpoint import load_checkpoint

    data = load_checkpoint(args.resume)
    saved = FFConfig.from_dict(data["config"])
    config = saved.replace(epochs=args.epochs) if _given(args, "epochs") else saved
    dataset_name = data["dataset"]
    if _given(args, "dataset") and args.dataset != dataset_name:
        raise ValueError(
            f"--resume checkpoint was trained on {dataset_name!r}, not {args.dataset!r}"
        )
    return config, dataset_name


def cmd_train(args: argparse.Namespace) -> int:
    from ffkern.data import load_dataset
    from ffkern.trainer import Trainer

    if args.parallel != "none":
        from ffkern.distributed import cli_train

        return cli_train(args)
    config, dataset_name = run_config(args)
    dataset = load_dataset(dataset_name, args.data, download=args.download)
    trainer = Trainer(
        config,
        dataset,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        metrics_path=args.metrics,
        checkpoint_path=args.checkpoint,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    if args.resume:
        trainer.resume(args.resume)
    result = trainer.fit(stop_after=args.stop_after)
    if result.history:
        last = result.history[-1]
        print(json.dumps({k: last[k] for k in ("epoch", "loss", "train_acc", "test_acc")}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ffkern.checkpoint import load_checkpoint
    from ffkern.data import load_dataset
    from ffkern.trainer import Trainer

    data = load_checkpoint(args.checkpoint)
    config = FFConfig.from_dict(data["config"])
    name = args.dataset or data["dataset"]
    dataset = load_dataset(name, args.data, download=args.download)
    trainer = Trainer(config, dataset, backend=args.backend, device=args.device)
    trainer.network.load_state_dict(data["network"])
    result: dict[str, Any] = {
        "checkpoint": args.checkpoint,
        "dataset": name,
        "epoch": data["epoch"],
    }
    result.update(trainer.evaluate())
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            shown = f"{100 * value:.2f}%" if key.endswith("_acc") or "_acc_" in key else value
            print(f"{key:>18}: {shown}")
    return 0


def _given(args: argparse.Namespace, name: str) -> bool:
    return name in getattr(args, "_explicit", set())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args._explicit = {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv}
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        log.error("%s", exc)
        print(f"ffkern {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
