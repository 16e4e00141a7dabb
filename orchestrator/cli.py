"""`vlcl`: the command line. Heavy imports (Ray, MLflow, open_clip) happen inside commands so
`vlcl --help` and `vlcl methods` answer quickly."""
from __future__ import annotations

import argparse
import importlib
import math
import sys

# (module, function) pairs that register more subcommands; a module that is absent is skipped
_COMMAND_MODULES = [
    ("streams.cli", "add_streams_commands"),
    ("orchestrator.sweep", "add_sweep_commands"),
    ("orchestrator.study", "add_study_commands"),
    ("orchestrator.ui", "add_ui_commands"),
    ("orchestrator.report", "add_report_commands"),
    ("orchestrator.pretrain", "add_pretrain_commands"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlcl", description="Continual learning of CLIP models on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a method over a stream, task after task (no config: the built-in demo)")
    run.add_argument("config", nargs="?", help="run config YAML (default: built-in digits demo)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set method.name=lwf --set train.lr=1e-4")
    run.add_argument("--resume", action="store_true", help="continue the last unfinished run of this config")
    run.add_argument("--verbose", action="store_true", help="also show Ray's, MLflow's and the libraries' logs "
                                                            "(always written to the run's log file)")
    run.set_defaults(handler=command_run)

    methods = sub.add_parser("methods", help="list the continual-learning methods and their hyperparameters")
    methods.add_argument("name", nargs="?", help="show one method's hyperparameters")
    methods.set_defaults(handler=command_methods)

    config = sub.add_parser("config", help="print the resolved run config (defaults + YAML + --set)")
    config.add_argument("config", nargs="?")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    config.set_defaults(handler=command_config)

    for module_name, function in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        getattr(module, function)(sub)
    return parser


def command_run(args) -> int:
    from orchestrator.config import load_run_config
    from orchestrator.run import run_sequence

    config = load_run_config(args.config, args.overrides)
    result = run_sequence(config, resume=args.resume, verbose=args.verbose)
    print_result(result)
    return 0


def format_matrix(tasks: list[str], matrix: list[list[float]], control_tasks: list[str] = (),
                  control_matrix: list[list[float]] = ()) -> str:
    """The accuracy matrix with full task names: one row per evaluation, one column per task (x100)."""
    labels = ["zero-shot"] + [f"after {t}" for t in tasks[:len(matrix) - 1]]
    columns = list(tasks) + [f"control: {c}" for c in control_tasks]
    rows = [list(row) + list(control_matrix[i] if i < len(control_matrix) else []) for i, row in enumerate(matrix)]
    label_width = max(len(label) for label in labels)
    widths = [max(len(c), 5) for c in columns]
    lines = [" " * label_width + "".join(f"  {c.rjust(w)}" for c, w in zip(columns, widths))]
    for label, row in zip(labels, rows):
        lines.append(label.ljust(label_width) + "".join(f"  {100 * v:{w}.1f}" for v, w in zip(row, widths)))
    return "\n".join(lines)


def print_result(result) -> None:
    print("\nAccuracy matrix (x100; rows: evaluated after; columns: task; top-1 or retrieval r_mean)")
    print(format_matrix(result.tasks, result.matrix, result.control_tasks, result.control_matrix))
    print("\n" + "  ".join(f"{k.removeprefix('cl/')} {100 * v:+.1f}" if k == "cl/bwt" else
                           f"{k.removeprefix('cl/')} {100 * v:.1f}" if "retention" not in k else
                           f"{k.removeprefix('cl/')} {v:.2f}"
                           for k, v in result.summary.items() if not math.isnan(v)))
    if result.skipped_samples:
        print(f"skipped bad samples: {result.skipped_samples} (on_bad_sample=skip)")
    print(f"\nMLflow run {result.run_id} in {result.tracking_uri}  ({result.wall_seconds:.0f} s)")
    try:
        from orchestrator.ui import print_ui_hint
    except ImportError:
        print(f"Open the UI: mlflow ui --backend-store-uri {result.tracking_uri}")
    else:
        print_ui_hint(result.tracking_uri, result.experiment_id)


def command_methods(args) -> int:
    from methods import METHODS, get_method

    if args.name:
        cls = get_method(args.name)
        print(f"{cls.name}: {cls.summary}")
        for field_name, field in cls.Hparams.model_fields.items():
            print(f"  {field_name} = {field.default!r}  {field.description or ''}")
        return 0
    for name in sorted(METHODS):
        print(f"{name:10s} {METHODS[name].summary}")
    return 0


def command_config(args) -> int:
    from orchestrator.config import load_run_config, to_yaml

    print(to_yaml(load_run_config(args.config, args.overrides)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from methods import HparamError, UnknownMethodError
    from methods.models import ModelError
    from orchestrator.config import ConfigError
    from streams.errors import StreamError

    user_errors: tuple = (ConfigError, StreamError, HparamError, UnknownMethodError, ModelError)
    try:
        from orchestrator.tracking import TrackingError

        user_errors += (TrackingError,)
    except ImportError:
        pass
    try:
        handler = getattr(args, "handler", None) or args.func
        return handler(args) or 0
    except user_errors as err:
        print(f"vlcl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
