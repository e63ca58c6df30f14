"""The ``fastconv`` command: parse arguments, call the library, print.

One small function per subcommand (``cmd_train``, ``cmd_evaluate``, ...) and one parser builder
each (``add_train_parser``, ...); a new subcommand adds its pair and one line in
:func:`build_parser`. Optional packages (matplotlib, starlette, mpi4py, dask, onnx) are imported
only by the command that needs them.

Exit status: 0 success, 1 an error the user can fix (missing file, bad image, missing dataset,
unwritable output: one line on stderr, no traceback), 2 bad command-line usage (argparse), 130
interrupted (Ctrl-C; ``train`` saves a checkpoint first and says how to resume).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

from . import (
    bench,
    dask_inference,
    data_parallel,
    datasets,
    functional,
    inference,
    io,
    models,
    plots,
    preprocess,
    recipe,
    serve,
)
from ._files import atomic_write
from ._version import __version__
from .threads import available_cores, get_num_threads, set_num_threads
from .train import SingleProcess, Trainer, TrainingInterrupted, random_shift, split_validation

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
# Where they used to be defined, for code that reads them from here.
RUN_DEFAULTS, DEFAULT_LR = recipe.RUN_DEFAULTS, recipe.DEFAULT_LR
FASHION_CLASSES = datasets.FASHION_CLASSES


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 1."""


# --------------------------------------------------------------------------------------------
# Argument types


def _number(convert, accept, expected: str):
    """An argparse type: `convert` the text, then refuse values `accept` rejects."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")


# --------------------------------------------------------------------------------------------
# Parsers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastconv",
        description="Train, evaluate and use small CNNs on the CPU (MNIST, Fashion-MNIST).",
        epilog="Run 'fastconv COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"fastconv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="threads for the kernels and BLAS (default: $FASTCONV_NUM_THREADS or all cores)",
    )
    add_train_parser(commands, threads)
    add_evaluate_parser(commands, threads)
    add_predict_parser(commands, threads)
    add_show_parser(commands, threads)
    add_serve_parser(commands, threads)
    add_bench_parser(commands, threads)
    add_info_parser(commands)
    return parser


def add_train_parser(commands, threads) -> None:
    p = commands.add_parser(
        "train",
        parents=[threads],
        help="train a model and save it",
        description=(
            "Train a CNN (default: the digit CNN, about 99.2% on MNIST in 3 epochs) and save it "
            "as one .npz. The last --val-size images of the training split are held out for "
            "validation after each epoch; the test split is scored once at the end. A checkpoint "
            "is written atomically after every epoch, every --checkpoint-every steps and on "
            "Ctrl-C; --resume continues from it bit-for-bit (same --threads for identical "
            "weights). A checkpoint that cannot be written (disk full, permissions) leaves the "
            "previous one intact; a warning says so and training continues."
        ),
    )
    run = p.add_argument_group("the run (a resumed run keeps the checkpoint's values)")
    run.add_argument(
        "--dataset", choices=["mnist", "fashion-mnist"], help="training data (default: mnist)"
    )
    run.add_argument("--arch", help="architecture: digit-cnn (default) or lenet5")
    run.add_argument("--epochs", type=positive_int, help="epochs (default: 3)")
    run.add_argument(
        "--batch-size", type=positive_int, metavar="N", help="mini-batch size (default: 64)"
    )
    run.add_argument(
        "--optimizer", choices=["sgd", "adam", "adamw"], help="optimiser (default: adamw)"
    )
    run.add_argument(
        "--lr",
        type=positive_float,
        help="peak learning rate (default: 0.002 for adam/adamw, 0.05 for sgd)",
    )
    run.add_argument(
        "--weight-decay",
        type=non_negative_float,
        metavar="W",
        help="weight decay (default: 0.01 adamw, 0 adam, 0.0005 sgd)",
    )
    run.add_argument("--momentum", type=fraction, help="SGD momentum (default: 0.9)")
    run.add_argument(
        "--schedule",
        choices=["cosine", "step", "constant"],
        help="learning rate: cosine decay to 0 over all steps (default), step "
        "(x0.1 each third of the epochs) or constant",
    )
    run.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="random shifts of up to 2 pixels (default: on for mnist, off for "
        "fashion-mnist, whose centred items it costs 1%% of test accuracy)",
    )
    run.add_argument(
        "--label-smoothing",
        type=fraction,
        metavar="EPS",
        help="label smoothing of the loss (default: 0)",
    )
    run.add_argument(
        "--seed",
        type=non_negative_int,
        help="seed of initialisation, shuffling, dropout, augmentation (default: 0)",
    )
    run.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="train on the first N training images only (quick runs, tests)",
    )
    run.add_argument(
        "--val-size",
        type=non_negative_int,
        metavar="N",
        help="training images held out for validation (default: 5000; 0: none)",
    )
    run.add_argument(
        "--patience",
        type=positive_int,
        metavar="EPOCHS",
        help="stop early after EPOCHS epochs without a lower validation loss",
    )
    files = p.add_argument_group("files and output")
    files.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder with the IDX files (default: $FASTCONV_DATA_DIR, the cache)",
    )
    files.add_argument(
        "--no-download",
        action="store_true",
        help="never download the dataset; fail if it is not found locally",
    )
    files.add_argument(
        "--out",
        metavar="PATH",
        help="where to save the trained model (default: model.npz, or the resumed run's)",
    )
    files.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="checkpoint file (default: OUT with .ckpt.npz, e.g. model.ckpt.npz)",
    )
    files.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=200,
        metavar="STEPS",
        help="also checkpoint every STEPS mini-batches (default: 200; 0: only "
        "at the end of each epoch and on Ctrl-C)",
    )
    files.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="continue the run saved in CHECKPOINT (default: the --checkpoint path)",
    )
    files.add_argument(
        "--test",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the test split at the end and store it in the model (default: on)",
    )
    files.add_argument(
        "--quiet", action="store_true", help="no progress bar and no per-epoch lines; errors only"
    )
    files.add_argument(
        "--plot",
        action="store_true",
        help="draw the loss and accuracy curves to curves.png beside --out, "
        "refreshed after every epoch (needs matplotlib)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel training over MPI, one process per rank: 'mpiexec -n K "
        "fastconv train --distributed ...' (needs fastconv[mpi]). --batch-size "
        "is the global batch, split across the ranks; --threads applies per "
        "rank (default: the node's cores divided among its ranks); validation "
        "is shared out; rank 0 alone prints and writes the files. Without "
        "mpiexec: a plain run",
    )
    p.set_defaults(func=cmd_train)


def add_evaluate_parser(commands, threads) -> None:
    p = commands.add_parser(
        "evaluate",
        parents=[threads],
        help="test accuracy, per-class accuracy, confusion matrix",
        description="Score a saved model on the test split of its dataset: accuracy, loss, "
        "accuracy of each class and the confusion matrix.",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by 'fastconv train'")
    p.add_argument(
        "--dataset",
        choices=["mnist", "fashion-mnist"],
        help="test data (default: the dataset the model was trained on)",
    )
    p.add_argument("--data-dir", metavar="DIR", help="folder with the IDX files")
    p.add_argument("--no-download", action="store_true", help="never download the dataset")
    p.add_argument("--limit", type=positive_int, metavar="N", help="score the first N test images")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=500,
        metavar="N",
        help="images per forward pass (default: 500)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="also draw the report to DIR/evaluation.png: confusion matrix, accuracy "
        "per class, the most confident mistakes (needs matplotlib)",
    )
    p.set_defaults(func=cmd_evaluate)


def add_predict_parser(commands, threads) -> None:
    p = commands.add_parser(
        "predict",
        parents=[threads],
        help="classify image files",
        description="Classify PNG/JPEG/... images (any size or colour; dark-on-light or "
        "light-on-dark) with a saved model. For a model of one-channel square images each "
        "image is framed as the model's training digits were (fastconv.preprocess); for any "
        "other input (an ONNX ImageNet classifier: 3x224x224) it is scaled to cover the "
        "model's height and width, centre-cropped, in RGB (or grey for one channel). Prints "
        "one line per image: 'FILE: CLASS (PROBABILITY) ...', most probable first.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="model file written by 'fastconv train', or an ONNX file"
    )
    p.add_argument(
        "images",
        metavar="IMAGE",
        nargs="+",
        help="image files, or folders (their image files, sorted by name)",
    )
    p.add_argument(
        "--top",
        type=positive_int,
        default=3,
        metavar="K",
        help="classes shown per image (default: 3)",
    )
    p.add_argument(
        "--mean",
        type=float,
        nargs="+",
        metavar="M",
        help="normalise (pixel - M) / S, pixels on a 0..1 scale: one value, or one per channel "
        "(default: the model file's, else 0)",
    )
    p.add_argument(
        "--std", type=float, nargs="+", metavar="S", help="see --mean (default: the file's, else 1)"
    )
    p.add_argument(
        "--imagenet",
        action="store_true",
        help="ImageNet's normalisation: --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        nargs=2,
        metavar=("H", "W"),
        help="the input's height and width, for a model file that leaves them open "
        "(an ONNX export with dynamic axes)",
    )
    p.add_argument(
        "--labels",
        metavar="FILE",
        help="class names, one per line (e.g. the ImageNet synsets of a model-zoo file)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--out",
        metavar="CSV",
        help="write every image's path, class and probabilities to CSV instead of printing them",
    )
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="classify on a Dask cluster (needs fastconv[dask]): a scheduler address "
        "(tcp://host:8786; the workers must see the image files) or local:N "
        "to start N local worker processes",
    )
    p.set_defaults(func=cmd_predict)


def add_show_parser(commands, threads) -> None:
    p = commands.add_parser(
        "show",
        parents=[threads],
        help="draw what a model learned and how it sees an image",
        description="Draw the first conv layer's filters (DIR/filters.png) and, for one image "
        "framed as 'fastconv predict' frames it, the activations of every conv layer "
        "(DIR/feature-maps.png); print the image's top classes. Needs matplotlib.",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by 'fastconv train'")
    p.add_argument("image", metavar="IMAGE", help="an image file (PNG, JPEG, ...)")
    p.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="folder for the pictures (default: the current folder)",
    )
    p.set_defaults(func=cmd_show)


def add_serve_parser(commands, threads) -> None:
    p = commands.add_parser(
        "serve",
        parents=[threads],
        help="web page: draw a digit, see the model's answer",
        description="Serve a page where you draw a digit (mouse, pen or finger) or upload an "
        "image and watch the model's probabilities, and its JSON API: POST "
        "/api/predict with a PNG or JPEG body, GET /api/model. Images are framed as "
        "in 'fastconv predict'. Needs starlette and uvicorn.",
    )
    p.add_argument("model", metavar="MODEL", help="model file written by 'fastconv train'")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; "
        "0.0.0.0 opens it to the network)",
    )
    p.add_argument(
        "--port",
        type=non_negative_int,
        default=8000,
        help="port (default: 8000; 0: any free port, the address is printed)",
    )
    p.add_argument(
        "--max-body",
        type=positive_int,
        metavar="BYTES",
        help="largest image accepted, in bytes (default: 5242880, 5 MiB)",
    )
    p.set_defaults(func=cmd_serve)


def add_bench_parser(commands, threads) -> None:
    p = commands.add_parser(
        "bench",
        parents=[threads],
        help="time every kernel against the NumPy reference and torch",
        description="Time every fastconv kernel and a LeNet-class training step and inference "
        "against the pure-NumPy reference and against PyTorch (when installed); "
        "print one table with speed-ups, GFLOP/s and the share of the sgemm "
        "ceiling measured on this machine.",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw the speed-ups as a bar chart (needs fastconv[viz])",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="TEXT",
        help="only the operations whose name contains one of these, e.g. 'conv' 'LeNet'",
    )
    p.add_argument(
        "--budget",
        type=positive_float,
        default=0.3,
        metavar="SECONDS",
        help="time spent timing each case on each backend (default: 0.3)",
    )
    p.set_defaults(func=cmd_bench)


def add_info_parser(commands) -> None:
    p = commands.add_parser(
        "info",
        help="version, compiled features, threads, BLAS",
        description="Show the fastconv version, whether the kernels were compiled with OpenMP, "
        "the thread count, the compiler flags and the BLAS library in use.",
    )
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    p.set_defaults(func=cmd_info)


# --------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        if hasattr(args, "threads"):  # commands that compute: kernels and BLAS set together
            set_num_threads(args.threads or get_num_threads())
        return args.func(args) or 0
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except (UserError, OSError, ValueError, TypeError) as err:
        if os.environ.get("FASTCONV_TRACEBACK"):
            raise
        _error(_one_line(err))
        return EXIT_ERROR
    finally:
        warnings.showwarning = previous_showwarning


def _error(message: str) -> None:
    print(f"fastconv: error: {message}", file=sys.stderr)


def _one_line(err: BaseException) -> str:
    text = (
        str(err)
        if not isinstance(err, OSError) or not err.filename
        else (f"{err.filename}: {err.strerror}")
    )
    return (
        " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(err).__name__
    )


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fastconv: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# train


def cmd_train(args) -> int:
    if not args.distributed:
        return _train(args)
    try:
        comm = data_parallel.get_comm()
    except ImportError as err:
        raise UserError(str(err)) from None
    parallel = data_parallel.DataParallel(comm)
    if parallel.size == 1:
        return _train(args)  # not started by mpiexec (or one rank): a plain run
    if args.threads is None and not os.environ.get("FASTCONV_NUM_THREADS"):
        set_num_threads(data_parallel.default_threads(comm))
    try:
        with data_parallel.abort_on_error(comm, report=_rank_error):
            return _train(args, parallel)
    except data_parallel.ReplicasDiverged as err:
        raise UserError(str(err)) from None


def _rank_error(err, rank, size) -> None:
    """How a failing rank reports before it aborts the job: one line for a user's mistake."""
    if isinstance(err, (UserError, OSError, ValueError, TypeError, KeyboardInterrupt)) and (
        not os.environ.get("FASTCONV_TRACEBACK")
    ):
        _error(f"rank {rank} of {size}: {_one_line(err)}; stopping all ranks")
    else:
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        _error(f"rank {rank} of {size} failed; stopping all ranks\n{text}")


def _train(args, parallel=None) -> int:
    """'fastconv train' in this process; ``parallel`` (a DataParallel) makes it one rank."""
    resumed = None
    if args.resume is not None:
        # Without a path: the --checkpoint given, else the one of --out (default model.npz).
        resume_path = Path(
            args.resume or args.checkpoint or _default_checkpoint(Path(args.out or "model.npz"))
        )
        resumed = io.load_checkpoint(resume_path)
        config = _resumed_config(args, resumed, resume_path)
        files = resumed.extra.get("files") or {}
        # The resumed run keeps its output, data folder and download choice unless told otherwise.
        args.out = args.out or files.get("out")
        args.data_dir = args.data_dir or files.get("data_dir")
        args.no_download = args.no_download or bool(files.get("no_download"))
        checkpoint = Path(args.checkpoint) if args.checkpoint else resume_path
    else:
        config = recipe.fresh_config(vars(args))
    out = Path(args.out or "model.npz")
    if resumed is None:
        checkpoint = Path(args.checkpoint) if args.checkpoint else _default_checkpoint(out)
    _check_writable_folder(out, "--out")
    _check_writable_folder(checkpoint, "--checkpoint")
    curves = out.with_name("curves.png") if args.plot else None
    if curves is not None:
        _plots()  # without matplotlib, say so now rather than after training
    files = {
        "out": str(out.resolve()),
        "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
        "no_download": args.no_download,
    }

    spec = datasets.dataset_spec(config["dataset"])
    x, y, validation = _training_data(config, args)

    if resumed is not None:
        model = resumed.build_model()
    else:
        model = models.create(config["arch"], num_classes=len(spec["classes"]), seed=config["seed"])
    optimizer = recipe.make_optimizer(model, config)
    steps_per_epoch = -(-len(x) // config["batch_size"])
    scheduler = recipe.make_scheduler(optimizer, config, steps_per_epoch)
    augment = random_shift if config["augment"] else None
    quiet = args.quiet or (parallel is not None and parallel.rank != 0)
    trainer: Trainer = Trainer(  # annotated: the log callback below refers to trainer
        model,
        optimizer,
        recipe.make_loss(config),
        scheduler=scheduler,
        scheduler_interval="step",
        batch_size=config["batch_size"],
        seed=config["seed"],
        augment=augment,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every or None,
        extra={"config": config, "threads": _threads(), "files": files},
        progress=not quiet,
        log=_curves_writer(lambda: trainer.history, curves, None if quiet else print),
        parallel=parallel,
    )
    if resumed is not None:
        trainer.resume(resumed)
        if not quiet and (trainer.epoch >= config["epochs"] or trainer.stopped_early):
            print(f"the run in {resume_path} is complete; saving its model")
        elif not quiet:
            print(f"resuming {resume_path} at epoch {trainer.epoch + 1}, step {trainer.step}")
    elif not quiet:
        held = f", {len(validation[0]):,} held out for validation" if validation else ""
        print(
            f"training {config['arch']} on {spec['title']}: {len(x):,} images{held}; "
            f"{_plural(config['epochs'], 'epoch')}, batch {config['batch_size']}, {config['optimizer']} "
            f"lr {config['lr']:g}, {_plural(_threads(), 'thread')}"
            f"{'' if parallel is None else f' per rank x {parallel.size} ranks'}; "
            f"checkpoint {checkpoint}"
        )
    started = time.perf_counter()
    try:
        history = trainer.fit(x, y, config["epochs"], validation, config["patience"])
    except TrainingInterrupted as stop:
        if parallel is not None and parallel.rank != 0:
            return EXIT_INTERRUPTED  # rank 0 says where the checkpoint is
        where = f"epoch {stop.epoch + 1}, step {stop.step}"
        if stop.checkpoint is not None:
            print(
                f"interrupted at {where}; checkpoint saved to {stop.checkpoint}\n"
                f"resume with: fastconv train --resume {stop.checkpoint}",
                file=sys.stderr,
            )
        else:
            print(f"interrupted at {where}; no checkpoint saved: {stop.error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    elapsed = time.perf_counter() - started
    if parallel is not None:  # the ranks finished together; rank 0 alone scores and saves
        if parallel.rank != 0:
            return 0
        trainer.parallel = SingleProcess()

    meta = {
        "dataset": config["dataset"],
        "classes": spec["classes"],
        "input_shape": [1, 28, 28],
        "mean": spec["mean"],
        "std": spec["std"],
        "architecture": config["arch"],
        "training": config,
        "history": history.to_dict(),
    }
    if args.test:
        x_test, y_test = datasets.load_dataset(
            config["dataset"], "test", args.data_dir, not args.no_download
        )
        result = inference.evaluate(model, x_test, y_test)
        meta["test_accuracy"] = result.accuracy
        meta["test_loss"] = result.loss
    try:
        io.save_model(model, out, meta)
    except io.SaveError as err:
        if trainer.save_checkpoint() is None:
            raise
        raise UserError(
            f"{err}; the trained weights are in {checkpoint}: "
            f"'fastconv train --resume {checkpoint}' saves the model again"
        ) from None
    if curves is not None:
        history.plot(curves)
    if not quiet:
        score = f"; test accuracy {meta['test_accuracy']:.2%}" if args.test else ""
        print(f"saved {out} after {_plural(len(history), 'epoch')} ({elapsed:.1f} s){score}")
        if curves is not None:
            print(f"training curves: {curves}")
    return 0


def _training_data(config, args):
    """``x, y, validation``: the last ``val_size`` training images are held out for validation
    (the same ones whatever ``--limit``), then ``--limit`` takes the first images of the rest."""
    x, y = datasets.load_dataset(config["dataset"], "train", args.data_dir, not args.no_download)
    if config["val_size"] >= len(x):
        raise UserError(f"--val-size {config['val_size']} leaves no training images")
    (x, y), (x_val, y_val) = split_validation(x, y, config["val_size"])
    if config["limit"] is not None:
        x, y = x[: config["limit"]], y[: config["limit"]]
    validation = (x_val, y_val) if len(x_val) else None
    if config["patience"] is not None and validation is None:
        raise UserError("--patience needs validation data (--val-size > 0)")
    if len(x) < 2:
        raise UserError("need at least 2 training images")
    return x, y, validation


def _resumed_config(args, checkpoint, path) -> dict:
    config = checkpoint.extra.get("config")
    if not isinstance(config, dict) or set(config) != set(recipe.RUN_DEFAULTS):
        raise UserError(f"{path}: not a checkpoint of 'fastconv train' (no run settings)")
    for name in recipe.RUN_DEFAULTS:
        given = getattr(args, name)
        if given is not None and given != config[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} {given} differs from the checkpoint's {config[name]}; a resumed run "
                f"keeps its settings (omit {flag}, or start a new run without --resume)"
            )
    saved_threads = checkpoint.extra.get("threads")
    if saved_threads is not None and saved_threads != _threads():
        print(
            f"note: the run used {_plural(saved_threads, 'thread')}, this one {_threads()}; "
            "the final weights may differ in the last bits from an uninterrupted run",
            file=sys.stderr,
        )
    return dict(config)


def _default_checkpoint(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".npz") + ".ckpt.npz")


def _check_writable_folder(path: Path, flag: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: folder {folder} does not exist")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file path")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: folder {folder} is not writable")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _threads() -> int:
    return get_num_threads()


# --------------------------------------------------------------------------------------------
# evaluate


def cmd_evaluate(args) -> int:
    model, meta = inference.load_any_model(args.model)
    plots = _plots() if args.plot else None
    dataset = args.dataset or meta.get("dataset") or "mnist"
    if dataset not in ("mnist", "fashion-mnist"):
        raise UserError(f"{args.model}: trained on {dataset!r}; pass --dataset mnist|fashion-mnist")
    spec = datasets.dataset_spec(dataset)
    x, y = datasets.load_dataset(dataset, "test", args.data_dir, not args.no_download)
    if args.limit is not None:
        x, y = x[: args.limit], y[: args.limit]
    result = inference.evaluate(model, x, y, batch_size=args.batch_size)
    classes = inference.class_names(meta, result.confusion.shape[0])
    if plots is not None:
        report = _write_report(model, x, y, classes, spec, Path(args.plot), plots)
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(args.model),
                    "dataset": dataset,
                    "classes": classes,
                    **result.to_dict(),
                }
            )
        )
        return 0
    print(
        f"{args.model} on {spec['title']} test ({result.count:,} images): "
        f"accuracy {result.accuracy:.2%}, loss {result.loss:.4f}"
    )
    print("per-class accuracy:")
    width = max(len(c) for c in classes)
    totals = result.confusion.sum(axis=1)
    for i, (name, accuracy) in enumerate(zip(classes, result.per_class_accuracy)):
        shown = "    n/a" if math.isnan(accuracy) else f"{accuracy:7.2%}"
        label = "" if name == str(i) else f" {name:<{width}}"
        print(f"  {i:>2}{label}  {shown}  ({totals[i]} images)")
    print("confusion matrix (rows: true class, columns: predicted class):")
    print(_format_matrix(result.confusion))
    if plots is not None:
        print(f"report: {report}")
    return 0


def _format_matrix(matrix) -> str:
    cell = max(len(str(int(matrix.max()))), 2) + 1
    header = "    " + "".join(f"{j:>{cell}}" for j in range(matrix.shape[1]))
    rows = [f"{i:>3} " + "".join(f"{int(v):>{cell}}" for v in row) for i, row in enumerate(matrix)]
    return "\n".join([header, *rows])


# --------------------------------------------------------------------------------------------
# predict


def cmd_predict(args) -> int:
    model, meta = inference.load_any_model(args.model)
    mean, std = args.mean, args.std
    if args.imagenet:
        if mean is not None or std is not None:
            raise UserError("--imagenet sets --mean and --std: give one or the other")
        mean, std = preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD
    if args.dask and (mean is not None or std is not None or args.size):
        raise UserError("--mean, --std, --imagenet and --size do not apply with --dask")
    if args.size:
        meta = inference.with_input_size(model, meta, args.size)
    elif "input_shape" not in meta and inference.declared_channels(model) not in (None, 1):
        raise UserError(
            f"{args.model}: the model's input leaves its height and width open: give --size H W"
        )
    image_input = inference.ImageInput.of(
        meta, str(args.model), use="predict", photos=not args.dask, mean=mean, std=std
    )
    if args.labels:
        meta = {**meta, "classes": inference.read_labels(args.labels)}
    classes = meta.get("classes")
    files = inference.image_files(args.images)
    results, probabilities = [], None
    if args.dask:
        names, probabilities, failures = _predict_on_dask(args, files)
    else:
        inputs, kept, errors = inference.frame_files(files, image_input)
        for index in sorted(errors):
            _error(inference.naming(files[index], errors[index]))
        names, failures = [str(files[i]) for i in kept], len(errors)
        if inputs is not None:
            probabilities = inference.predict_proba(model, inputs)
    if probabilities is not None and len(probabilities):
        if args.labels and len(meta["classes"]) != probabilities.shape[1]:
            raise UserError(
                f"--labels {args.labels}: {len(meta['classes'])} names for a model of "
                f"{probabilities.shape[1]} classes"
            )
        classes = inference.class_names(meta, probabilities.shape[1])
        top = min(args.top, probabilities.shape[1])
        for name, probs in zip(names, probabilities):
            order = np.argsort(-probs, kind="stable")[:top]
            results.append((name, [(int(i), classes[i], float(probs[i])) for i in order]))
    if args.out:
        count = _write_predictions(Path(args.out), names, probabilities, classes)
        print(f"wrote {count} prediction{'' if count == 1 else 's'} to {args.out}")
    elif args.json:
        print(
            json.dumps(
                [
                    {
                        "file": name,
                        "top": [
                            {"class": i, "label": label, "probability": p} for i, label, p in ranked
                        ],
                    }
                    for name, ranked in results
                ]
            )
        )
    else:
        for name, ranked in results:
            print(f"{name}: " + "  ".join(f"{label} ({p:.2f})" for _, label, p in ranked))
    return EXIT_ERROR if failures else 0


def _predict_on_dask(args, files):
    """``names, probabilities, failures`` of the readable files, computed on ``--dask``."""
    try:
        with dask_inference.dask_client(args.dask) as client:
            result = dask_inference.predict_files_dask(args.model, files, client)
    except ImportError as err:
        raise UserError(str(err)) from None
    for index in sorted(result.errors):
        _error(result.errors[index])
    kept = [i for i in range(len(files)) if i not in result.errors]
    return [str(files[i]) for i in kept], result.probabilities[kept], len(result.errors)


def _write_predictions(path: Path, names, probabilities, classes) -> int:
    """CSV of path, most probable class, then one probability column per class, written to a
    temporary file renamed over ``path`` (no half-written file). Returns the row count."""
    _check_writable_folder(path, "--out")
    rows = [] if probabilities is None else probabilities
    labels = classes or [str(i) for i in range(len(rows[0]) if len(rows) else 0)]
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", *labels])
        for name, probs in zip(names, rows):
            writer.writerow([name, labels[int(probs.argmax())], *(f"{p:.6g}" for p in probs)])
    return len(rows)


# --------------------------------------------------------------------------------------------
# show, serve, and the pictures of train --plot and evaluate --plot


def cmd_show(args) -> int:
    plots = _plots()
    model, meta = inference.load_any_model(args.model)
    image_input = inference.ImageInput.of(meta, str(args.model), use="show")
    x = image_input.frame(args.image)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, expected a folder")
    filters = plots.plot_filters(model, out / "filters.png")
    maps = plots.plot_feature_maps(model, x, out / "feature-maps.png", image=image_input.pixels(x))
    probabilities = inference.predict_proba(model, x[None])[0]
    classes = inference.class_names(meta, len(probabilities))
    ranked = sorted(range(len(probabilities)), key=lambda i: -probabilities[i])[:3]
    print(f"{args.image}: " + "  ".join(f"{classes[i]} ({probabilities[i]:.2f})" for i in ranked))
    print(
        f"wrote {out / 'filters.png'} ({len(filters)} filters) and {out / 'feature-maps.png'} "
        f"({len(maps)} conv layers)"
    )
    return 0


def cmd_serve(args) -> int:
    try:
        serve.require_dependencies()
    except ImportError as err:
        raise UserError(str(err)) from None
    options = {} if args.max_body is None else {"max_body": args.max_body}
    app = serve.create_app(args.model, **options)
    serve.serve_app(
        app,
        host=args.host,
        port=args.port,
        ready=lambda url: print(f"serving {args.model} at {url} (Ctrl-C to stop)", flush=True),
    )
    return 0


def _plots():
    """fastconv.plots, or a one-line error saying how to install matplotlib."""
    try:
        plots.require_matplotlib()
    except ImportError as err:
        raise UserError(str(err)) from None
    return plots


def _write_report(model, x, y, classes, spec, folder: Path, plots) -> Path:
    """The evaluation report of ``model`` on normalised ``x`` as ``folder/evaluation.png``."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--plot {folder}: is a file, expected a folder")
    path = folder / "evaluation.png"
    pixels = x * spec["std"] + spec["mean"]  # the digits as they look, not as normalised
    plots.plot_evaluation(model, x, y, path, images=pixels, classes=classes)
    return path


def _curves_writer(history_of, path: Path | None, log):
    """The per-epoch line for Trainer's ``log``: print it, then redraw the curves (a picture
    that cannot be written is a warning; training goes on)."""

    def on_epoch(line: str) -> None:
        if log is not None:
            log(line)
        if path is not None:
            try:
                history_of().plot(path)
            except OSError as err:
                warnings.warn(f"cannot write {path}: {_one_line(err)}", stacklevel=2)

    return on_epoch


# --------------------------------------------------------------------------------------------
# info


def cmd_bench(args) -> int:
    plots = _plots() if args.plot else None  # fail before the run, not after it
    if os.environ.get("OPENBLAS_CORETYPE"):
        print(
            f"note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set; NumPy's sgemm "
            "may run far below this CPU's speed (unset it, and OPENBLAS_L2_SIZE, to benchmark)",
            file=sys.stderr,
        )
    rows, ceiling = bench.run(threads=get_num_threads(), budget=args.budget, selected=args.only)
    print(bench.format_table(rows, ceiling))
    print(f"threads: {get_num_threads()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"sgemm_gflops": ceiling, "threads": get_num_threads(), "rows": rows}, indent=2
            )
        )
    if plots is not None:
        plots.plot_benchmark(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_info(args) -> int:
    blas = []
    try:
        from threadpoolctl import threadpool_info

        blas = [
            {
                key: pool.get(key)
                for key in (
                    "user_api",
                    "internal_api",
                    "version",
                    "num_threads",
                    "threading_layer",
                    "filepath",
                )
            }
            for pool in threadpool_info()
        ]
    except ImportError:
        pass
    info = {
        "fastconv": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "threads": get_num_threads(),
        "cores": available_cores(),
        "FASTCONV_NUM_THREADS": os.environ.get("FASTCONV_NUM_THREADS"),
        **functional.kernel_info(),
        "thread_pools": blas,
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"fastconv {info['fastconv']} (Python {info['python']}, NumPy {info['numpy']})")
    print(f"OpenMP:          {'yes' if info['openmp'] else 'no (kernels run single-threaded)'}")
    env = (
        f", FASTCONV_NUM_THREADS={info['FASTCONV_NUM_THREADS']}"
        if info["FASTCONV_NUM_THREADS"]
        else ""
    )
    print(f"threads:         {info['threads']} (of {info['cores']} cores{env})")
    print(f"compiler flags:  {info['cflags']}")
    print(f"conv GEMM:       {info['conv_gemm']}")
    print(f"Winograd 3x3:    {info['winograd']}")
    print(f"micro-kernels:   {info['microkernels']}")
    print(f"conv algorithm:  {info['conv_algorithm']}")
    for pool in blas:
        api = "BLAS" if pool["user_api"] == "blas" else pool["user_api"]
        details = ", ".join(
            f"{k} {pool[k]}"
            for k in ("version", "threading_layer", "num_threads")
            if pool.get(k) is not None
        )
        print(f"{api + ':':<17}{pool['internal_api']} ({details}) {pool['filepath']}")
    if not blas:
        print("BLAS:            unknown (threadpoolctl not installed); see numpy.show_config()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
