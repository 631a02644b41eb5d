"""The `ptd` command line: train | prune | design | cache | distill | report | run | sweep | import | export.

Each stage subcommand runs that stage (and nothing else) on a run directory; `ptd run` chains all of them and
resumes an interrupted run. Configuration: a TOML file (--config, see configs/) plus `--set section.key=value`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from pathlib import Path

DEFAULT_OUT = "runs/default"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="on an error, show its traceback too")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "train the teacher"), ("prune", "prune the teacher iteratively"),
                            ("design", "design students from the pruned teacher"),
                            ("cache", "precompute the teachers' logits (sparse inference) for distillation"),
                            ("distill", "train every student variant of the comparison"),
                            ("report", "write the summary table and plots"), ("run", "all stages, resumable"),
                            ("sweep", "choose KD temperature and alpha on the validation split")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--config", help="TOML file (default: the fast Fashion-MNIST preset)")
        command.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override one configuration value (repeatable)")
        command.add_argument("--out", default=DEFAULT_OUT, help=f"run directory (default {DEFAULT_OUT})")
        command.add_argument("--seeds", type=int, help="repeat the comparison with N seeds (run.seeds); sweep: "
                             "each setting, without changing run.seeds (default 1)")
        command.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_debug(command)
        if name == "sweep":
            command.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 4.0, 10.0], metavar="T",
                                 help="KD temperatures to try (default 2 4 10)")
            command.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.9, 0.95], metavar="A",
                                 help="KD alphas to try (default 0.5 0.9 0.95)")
            command.add_argument("--teachers", nargs="+", default=["pruned", "unpruned"],
                                 choices=["pruned", "unpruned"], help="teachers to distil from (default both)")
        if name in ("cache", "distill", "run", "sweep"):
            command.add_argument("--cache", metavar="DIR", help="teacher-logit cache folder: `ptd cache` writes it, "
                                 "distill and run read it (sets cache.enabled=true, cache.dir=DIR)")
    imported = sub.add_parser("import", help="turn a torch.nn.utils.prune state dict into a ptd model folder")
    imported.add_argument("state_dict", help="a file saved with torch.save(model.state_dict()), loaded weights_only")
    imported.add_argument("--model", required=True,
                          help="architecture name (vgg11/16/19, vgg_fmnist, resnet18, mobilenetv2) or your own "
                          "model's constructor, package.module:function (imported; the working directory counts)")
    imported.add_argument("--kwargs", default="{}", metavar="TOML_TABLE",
                          help="keyword arguments of the constructor, a TOML inline table, e.g. "
                          "'{num_classes = 10, in_channels = 1}'")
    imported.add_argument("--in-channels", type=int, default=3)
    imported.add_argument("--classes", type=int, default=10)
    imported.add_argument("--image-size", type=int, default=32)
    imported.add_argument("--out", required=True, help="folder to write (model.json, weights and masks)")
    _add_debug(imported)
    exported = sub.add_parser("export", help="write a model folder (a run's, or ptd import's) to ONNX, pruned "
                              "weights as zeros, checked in ONNX Runtime")
    exported.add_argument("model", help="a model folder, e.g. runs/default/prune/sparsity_0.90/model")
    exported.add_argument("--out", required=True, help="the .onnx file to write")
    exported.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    exported.add_argument("--no-check", action="store_true", help="do not run the file in ONNX Runtime")
    exported.add_argument("--trust", metavar="PACKAGE.MODULE:FUNCTION",
                          help="the folder's model is built by your own factory: import and call it")
    _add_debug(exported)
    return parser


def _add_debug(command: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand that was not given --debug leaves the value `ptd --debug <command>` set alone.
    command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on an error, show its traceback too")


def _log_beside_progress_bars():
    """On a terminal, log lines go through tqdm.write so that they print above a stage's bar instead of through it;
    in a log file there are no bars (ptd_sparse.pipeline.progress) and logging stays as it is."""
    if sys.stderr.isatty():
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()
    return contextlib.nullcontext()


# Errors whose message is meant for the user (bad input, missing files, a directory in use, a failed operation);
# any other type is a fault of the program, and its name goes with the message.
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError)


def _sentence(error: Exception) -> str:
    """An exception as one line: its message (the first line of a longer one), a KeyError's missing key named, an
    OSError's file named."""
    if isinstance(error, KeyError) and len(error.args) == 1 and " " not in str(error.args[0]):
        message = f"missing key {error.args[0]!r}"
    elif isinstance(error, OSError) and error.strerror and error.filename:
        message = f"{error.strerror}: {error.filename}"  # without the "[Errno 2]" of str(error)
    else:
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = message.strip().splitlines() or ["(no message)"]
    sentence = lines[0] + (" (--debug shows the rest)" if len(lines) > 1 else "")
    return sentence if isinstance(error, _USER_ERRORS) else f"{type(error).__name__}: {sentence}"


def main(argv: list[str] | None = None) -> int:
    """`ptd ...`: 0 on success; 2 with one line `ptd: error: ...` on stderr for any error (`--debug`: and its
    traceback); 130 on Ctrl-C."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("ptd: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(f"ptd: error: {_sentence(error)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ptd_sparse.pipeline.config import load_config

    if args.command == "import":
        import tomllib

        from ptd_sparse.pipeline import factories
        from ptd_sparse.pipeline.importing import import_state_dict_file

        try:
            kwargs = tomllib.loads(f"kwargs = {args.kwargs}")["kwargs"]
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"--kwargs must be a TOML inline table like '{{a = 1}}': {error}") from None
        if factories.is_factory(args.model):
            factories.trust(args.model)  # named on the command line: the user asks for it to be imported
        sparsity = import_state_dict_file(Path(args.state_dict), args.model, args.in_channels, args.classes,
                                          args.image_size, Path(args.out), kwargs)
        print(f"wrote {args.out} (sparsity {sparsity:.4f})")
        return 0
    if args.command == "export":
        from ptd_sparse.onnx_export import export
        from ptd_sparse.pipeline import factories

        if args.trust:
            factories.trust(args.trust)
        result = export(Path(args.model), Path(args.out), opset_version=args.opset, check=not args.no_check)
        checked = "not checked" if result.max_abs_error is None else \
            f"ONNX Runtime matches PyTorch within {result.max_abs_error:.2g}"
        print(f"wrote {result.path} ({result.zeros} of {result.weights} weights zero; {checked})")
        return 0
    overrides = list(args.set)
    if args.seeds is not None and args.command != "sweep":
        overrides.append(f"run.seeds={args.seeds}")
    if args.quiet:
        overrides.append("run.progress=false")
    if getattr(args, "cache", None):
        overrides += ["cache.enabled=true", f"cache.dir={json.dumps(args.cache)}"]
    if args.command == "cache":
        overrides.append("cache.enabled=true")
    if args.command == "sweep" and args.seeds is None:
        args.seeds = 1  # the sweep's own default; --seeds N repeats every setting N times
    config = load_config(args.config, overrides)
    from ptd_sparse import distributed
    from ptd_sparse.pipeline import caching, stages
    from ptd_sparse.pipeline.report import write_report
    from ptd_sparse.pipeline.run_directory import Run

    main_rank = True
    run = Run(Path(args.out), config)
    try:
        run.open()
        main_rank = distributed.is_main()  # read before teardown, after which every process looks like rank 0
        if args.command == "sweep":
            from ptd_sparse.pipeline.sweep import sweep_distillation

            with _log_beside_progress_bars():
                result = sweep_distillation(run, args.temperatures, args.alphas, args.seeds, tuple(args.teachers))
            if main_rank:
                print(result["table"])
            return 0
        action = {"train": stages.train_teacher, "prune": stages.prune_teacher, "design": stages.design_students,
                  "cache": caching.cache_teacher,
                  "distill": stages.distill_students, "report": write_report, "run": stages.run_all}[args.command]
        with _log_beside_progress_bars():
            result = action(run)
    finally:
        run.close()
        distributed.teardown()
    if main_rank:
        if args.command in ("run", "report"):
            print((run.dir / "report" / "summary.md").read_text())
            print(f"report: {run.dir / 'report'}")
        else:
            print(stages.describe(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
