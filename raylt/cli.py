"""The `raylt` command: `run`, `fit`, `ablate`, `tune`, `embed`, `predict`, `report`, `log`, `config`, `list`.

Errors caused by input (config, data, weights) print as one line, `raylt: error: ...`, and
exit with status 2; anything else is a bug and keeps its traceback.

Each command imports what it runs inside its function: `raylt config`, `raylt list` and
`--help` then start without Ray, MLflow or (for `config`) torch.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

from raylt import __version__
from raylt.errors import RayltError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file, or a shipped config's name (`raylt list`); "
                                             "defaults only if omitted")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. embed.batch_size=64")


def _class_text_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class-text", help="Parquet file (label, embedding): the classes' CLIP text embeddings, for the "
                                        "text prior, the zero-shot ensemble and the zero-shot row (rows of a label "
                                        "are averaged)")


def cmd_config(args) -> int:
    from raylt.config import dump_yaml, load_config

    if args.reference:
        from raylt.config.reference import reference

        print(reference(), end="")
        return 0
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_embed(args) -> int:
    from raylt.choices import check_names
    from raylt.config import load_config
    from raylt.data import load_source
    from raylt.embed.recipe import finished_store

    from raylt import tracking

    cfg = load_config(args.config, args.overrides)
    check_names(cfg)
    source = load_source(cfg.data)
    found = None if args.retry_skipped else finished_store(cfg, source)
    if found is not None:  # nothing to compute and nothing new to log: no Ray, no MLflow run
        _print_store(cfg, found.path, found.manifest(), "reused")
        return 0
    from raylt.embed.backbones import build_encoder  # torch and Ray: only when there is work
    from raylt.embed.stage import run_embed

    encoder = build_encoder(cfg.backbone)  # a bad backbone or missing weights: before an MLflow run starts
    tracking.check_reachable(cfg)
    with tracking.start_run(cfg, "embed") as run:
        res = run_embed(cfg, source, encoder, retry_skipped=args.retry_skipped)
        if run is not None:
            tracking.log_embed(res)
    how = "reused" if res.reused else f"{res.computed_rows} images in {res.seconds:.1f} s ({res.images_per_s:.0f} images/s)"
    if res.computed_rows > res.encoded_rows:
        how += f", {res.computed_rows - res.encoded_rows} of them from the image cache"
    _print_store(cfg, res.store, res.manifest, how)
    if run is not None:
        print(f"mlflow: run {run.info.run_id} in {tracking.redact(tracking.tracking_uri(cfg))}")
    return 0


def _print_store(cfg, path, m: dict, how: str) -> None:
    from raylt.embed.mirror import store_location

    print(f"store: {store_location(cfg.store.root, path)}")
    print(f"embeddings: {m['embedded']} (D={m['dim']}), skipped: {m['skipped']}, {how}")


def _summary(cfg, results) -> None:
    """Overall / many / medium / few of each fit, one row per recipe, then where each went."""
    from raylt import tracking
    from raylt.experiments.tables import COLUMNS, accuracy_cells, markdown
    from raylt.methods.recipes import recipe_label

    labels = [recipe_label(cfg), "baseline: CE head, real only"]
    print(markdown(["recipe", *COLUMNS], [[label, *accuracy_cells(r.metrics)] for label, r in zip(labels, results)]))
    for r in results:
        print(f"metrics: {r.out / 'metrics.json'}")
        if r.run_id and r.model_uri:
            print(f"mlflow: run {r.run_id} in {tracking.redact(tracking.tracking_uri(cfg))} (model {r.model_uri})")
        elif r.run_id:
            print(f"mlflow: run {r.run_id} is incomplete (the server was lost); `raylt log {r.out}` logs the results")


def cmd_run(args) -> int:
    from raylt.config import expand_path, load_config
    from raylt.preflight import check_fits

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out).expanduser().resolve() if args.out else expand_path(cfg.train.output_dir) / cfg.name
    check_fits(cfg, out, args.baseline)  # before torch and Ray are imported: a mistake costs a fraction of a second
    from raylt.pipeline import run

    _summary(cfg, run(cfg, baseline=args.baseline, out=out))
    return 0


def cmd_fit(args) -> int:
    from raylt.config import load_config
    from raylt.embed.inputs import open_embeddings
    from raylt.methods.recipes import baseline_config
    from raylt.preflight import check_fits

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out).expanduser().resolve()
    check_fits(cfg, out, args.baseline)
    es = open_embeddings(args.embeddings, args.class_names, cfg.store.staging)
    text = _class_text(args, es)
    from raylt.pipeline import fit  # Ray Train and torch only once the inputs are valid: bad input fails at once
    results = [fit(cfg, es, out, class_text=text)]
    if args.baseline:
        results.append(fit(baseline_config(cfg), es, out / "baseline", run_name="baseline"))
    _summary(cfg, results)
    return 0


def _class_text(args, es):
    """`--class-text` read for the classes of `es`, or None."""
    if not args.class_text:
        return None
    from raylt.embed.class_text import read_class_text

    return read_class_text(args.class_text, es.class_names, es.dim)


def _embeddings_of(args, cfg):
    """`--embeddings`, else the config's data set embedded (or its store reused)."""
    from raylt.embed.inputs import open_embeddings
    from raylt.pipeline import embedded

    return open_embeddings(args.embeddings, args.class_names, cfg.store.staging) if args.embeddings else embedded(cfg)


def _out_dir(args, cfg, sub: str) -> Path:
    from raylt.config import expand_path

    return Path(args.out).expanduser().resolve() if args.out else expand_path(cfg.train.output_dir) / cfg.name / sub


def cmd_ablate(args) -> int:
    from raylt.choices import check_names
    from raylt.config import load_config

    cfg = load_config(args.config, args.overrides)
    check_names(cfg)
    from raylt.experiments.ablation import ablate, markdown

    es = _embeddings_of(args, cfg)
    out = _out_dir(args, cfg, "ablation")
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else None
    rows = ablate(cfg, es, out, names, args.parallel, _class_text(args, es))
    print(markdown(rows))
    print(f"report: {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0


def cmd_tune(args) -> int:
    from raylt import tracking
    from raylt.choices import check_names
    from raylt.config import load_config

    cfg = load_config(args.config, args.overrides)
    check_names(cfg)
    from raylt.experiments.tune import check_space, check_tunable, fmt, markdown, read_space, sweep

    space, source = read_space(Path(args.space) if args.space else None)
    check_space(cfg, space, source)  # before any embedding
    check_tunable(cfg, space)
    tracking.check_reachable(cfg)
    es = _embeddings_of(args, cfg)
    out = _out_dir(args, cfg, "tune")
    report = sweep(cfg, es, out, space, source, args.num_samples, args.concurrent)
    best = report["best"]
    print(markdown(report["rows"], best))
    print(f"best: class-balanced val accuracy {best['val_balanced']:.4f} ({report['val_from']}) with "
          + ", ".join(f"{k}={fmt(v)}" for k, v in best["params"].items()))
    print(f"config: {out / 'best.yaml'} (raylt run {out / 'best.yaml'})")
    return 0


def cmd_report(args) -> int:
    from raylt import tracking
    from raylt.config import RayltConfig
    from raylt.errors import ConfigError
    from raylt.experiments import report

    if bool(args.runs) == bool(args.experiment):
        raise ConfigError("name run ids or --experiment NAME (one of the two)")
    uri = args.tracking_uri or tracking.tracking_uri(RayltConfig())
    table = report.rows(report.fetch(args.runs, uri, args.experiment, args.last))
    md, png = report.write(table, Path(args.out).expanduser().resolve())
    print(report.markdown(table))
    print(f"report: {md}, {png}")
    return 0


def cmd_log(args) -> int:
    from raylt import tracking

    run_id, model_uri = tracking.log_saved(Path(args.out), args.tracking_uri)
    print(f"mlflow: run {run_id} (model {model_uri})")
    return 0


def cmd_predict(args) -> int:
    from raylt import tracking
    from raylt.config import BackboneConfig, RayltConfig, load_config
    from raylt.serve.model import load_model

    cfg = load_config(args.config, args.overrides)
    uri = args.tracking_uri or tracking.tracking_uri(RayltConfig())
    model = load_model(args.model, uri)  # a wrong model URI fails before torch and Ray are imported
    from raylt.serve.predict import Request, predict
    # backbone.* set in --config or on the command line (where the weights are on this machine)
    # go over the model's own backbone config.
    default = BackboneConfig()
    overrides = {f.name: getattr(cfg.backbone, f.name) for f in dataclasses.fields(BackboneConfig)
                 if getattr(cfg.backbone, f.name) != getattr(default, f.name)}
    root = Path(args.root) if args.root else None
    req = Request(model, Path(args.input).expanduser().resolve(), cfg, overrides, root, args.split)
    res = predict(req, args.kind, Path(args.out).expanduser().resolve(), args.top_k, args.format)
    print(f"predictions: {res.out} ({res.rows} rows, top-{args.top_k} of {len(model.class_names)} classes, "
          f"{res.seconds:.1f} s)")
    if res.failed:
        print(f"without a prediction: {res.failed} rows; the `error` column says why")
    if res.labelled:
        print(f"accuracy on the {res.labelled} labelled rows: top-1 {res.top1:.3f}, top-{args.top_k} {res.topk:.3f}")
    return 0


def cmd_list(args) -> int:
    from raylt.choices import LISTED
    from raylt.config import shipped_configs

    for title, key, registry in LISTED:
        print(f"{title} ({key}):")
        for name, help in registry.describe():
            print(f"  {name:<12} {help}")
    if args.models:
        import open_clip

        from raylt.embed.backbones import register_model_configs

        register_model_configs(None)
        print("open_clip architectures (backbone.model):")
        print("  " + " ".join(open_clip.list_models()))
        print("open_clip pretrained tags (backbone.model / backbone.pretrained):")
        for model, tag in open_clip.list_pretrained():
            print(f"  {model} / {tag}")
    root = shipped_configs()
    if root is not None:
        print(f"configs ({root}; name one without its folder or .yaml: `raylt run demo`):")
        for c in sorted(p.relative_to(root) for p in root.rglob("*.yaml")):
            print(f"  {c}")
    return 0


def console(quiet: bool, verbose: bool) -> None:
    """What the console shows: raylt's own progress and results; Ray's execution reports and
    progress bars only with -v (each stage logs its own progress); with -q, warnings and results."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from raylt.ops.console import set_verbose

    set_verbose(verbose)
    # matplotlib's font search logs ~60 DEBUG lines per figure: noise even at -v.
    logging.getLogger("matplotlib").setLevel(logging.INFO)
    if not verbose:
        # Ray Data's bars redraw hundreds of lines per stage, and its plan reports repeat per stage.
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data sets its level when imported
        # MLflow's and its database migrations' INFO lines are theirs, not raylt's. MLflow sets
        # its loggers' level when imported, from this variable; Ray's: raylt.ops.console.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for name in ("ray.data", "ray.tune", "ray.train", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we chose so
        # Libraries' deprecation notices speak to raylt's developers, not its users.
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylt", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"raylt {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the whole pipeline: embed, class stats, sampler, head (Ray Train), evaluation")
    _config_args(p)
    p.add_argument("--baseline", action="store_true", help="also fit the plain CE head on real embeddings and compare")
    p.add_argument("--out", help="output folder (default: <train.output_dir>/<name>)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("fit", help="fit and evaluate a head on precomputed embeddings (Parquet or a store)")
    p.add_argument("--embeddings", required=True, help="Parquet file or folder (embedding, label, split) or a store (a folder, or s3://.../<fingerprint>)")
    p.add_argument("--out", required=True, help="output folder: metrics.json, per_class.png, head, checkpoints")
    p.add_argument("--config", help="YAML config (see configs/); defaults if omitted")
    p.add_argument("--class-names", help="text file, one class name per line in label order")
    p.add_argument("--baseline", action="store_true", help="also fit the plain CE head on real embeddings and compare")
    _class_text_arg(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. sampler.target=200")
    p.set_defaults(fn=cmd_fit)
    p = sub.add_parser("ablate", help="every long-tail method on the same embeddings, side by side (MLflow child runs)")
    _config_args(p)
    p.add_argument("--embeddings", help="Parquet file or folder or a store; default: embed the config's data set")
    p.add_argument("--class-names", help="text file, one class name per line in label order")
    p.add_argument("--out", help="output folder (default: <train.output_dir>/<name>/ablation)")
    _class_text_arg(p)
    p.add_argument("--recipes", help="comma-separated subset, e.g. ce,default,ip_dpp (default: all, then best)")
    p.add_argument("--parallel", type=int, default=0, help="fits at once (default: as many as the CPUs hold)")
    p.set_defaults(fn=cmd_ablate)
    p = sub.add_parser("tune", help="hyperparameter search over the embeddings (Ray Tune, MLflow child runs)")
    _config_args(p)
    p.add_argument("--embeddings", help="Parquet file or folder or a store; default: embed the config's data set")
    p.add_argument("--class-names", help="text file, one class name per line in label order")
    p.add_argument("--space", help="YAML search space, `key: {choice|grid|uniform|loguniform|randint: [...]}` per line "
                                   "(default: sampler.target, sampler.kappa, train.lr, head.tau)")
    p.add_argument("--num-samples", type=int, default=8, help="trials (grid values multiply them; default 8)")
    p.add_argument("--concurrent", type=int, default=0, help="trials at once (default: the cluster's CPUs)")
    p.add_argument("--out", help="output folder (default: <train.output_dir>/<name>/tune)")
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("embed", help="embed a data set into the embedding store (Ray Data)")
    _config_args(p)
    p.add_argument("--retry-skipped", action="store_true",
                   help="embed again the images a finished store skipped as unreadable (fixed since)")
    p.set_defaults(fn=cmd_embed)
    p = sub.add_parser("predict", help="top-k predictions of a logged model over images or embeddings (Ray Data)")
    p.add_argument("model", help="runs:/<run id>/model, models:/<name>/<version>, or a fit's output folder")
    p.add_argument("input", help="embeddings (Parquet file or folder, or a store), an image folder, or a list file "
                                 "of image paths (`path [label]` per line)")
    p.add_argument("--out", required=True, help="output file: .parquet or .csv")
    p.add_argument("--top-k", type=int, default=5, help="classes per row (default 5)")
    p.add_argument("--format", choices=("parquet", "csv"), help="default: from the --out suffix")
    p.add_argument("--kind", choices=("embeddings", "images", "list"), help="input kind (default: detected)")
    p.add_argument("--root", help="list file: the folder its paths are relative to (default: the file's folder)")
    p.add_argument("--split", help="embeddings: only this split (e.g. test)")
    p.add_argument("--tracking-uri", help="where the model is logged (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--config", help="YAML config for embed.*, ray.* and backbone.* settings")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. embed.batch_size=64 backbone.cache_dir=/w")
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("report", help="side-by-side table and plot of MLflow runs")
    p.add_argument("runs", nargs="*", metavar="RUN_ID", help="MLflow run ids")
    p.add_argument("--experiment", help="instead of ids: the latest finished runs of this experiment (a config's name)")
    p.add_argument("--last", type=int, default=10, help="with --experiment: how many runs (default 10)")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else ./mlflow.db")
    p.add_argument("--out", default="report", help="folder for report.md and report.png (default ./report)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("log", help="log a finished fit's output folder to MLflow (after the server was lost)")
    p.add_argument("out", help="the fit's output folder (metrics.json, run.json, head.npz)")
    p.add_argument("--tracking-uri", help="log to this server instead of the one the fit used")
    p.set_defaults(fn=cmd_log)
    p = sub.add_parser("config", help="print the resolved config as YAML")
    _config_args(p)
    p.add_argument("--reference", action="store_true", help="print every key, its type, default and meaning "
                                                            "(docs/CONFIG.md) instead")
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("list", help="registered backbones, data sources and shipped configs")
    p.add_argument("--models", action="store_true", help="also list open_clip architectures and pretrained tags")
    p.set_defaults(fn=cmd_list)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as the commands take it: every `key=value` in `overrides`."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`raylt tune CONFIG --space s.yaml train.epochs=5`);
    # argparse stops filling a positional list once options come between.
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    config = getattr(args, "config", None)
    if config and "=" in config and not Path(config).exists():  # no config file, only overrides
        args.config, args.overrides = None, [config, *args.overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console(args.quiet, args.verbose)
    try:
        return args.fn(args)
    except RayltError as e:
        print(f"raylt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raylt: interrupted; finished shards are kept and a re-run continues from them", file=sys.stderr)
        return 130


def command() -> None:
    """The `raylt` console command: `main`, then an exit that skips the interpreter's teardown.

    Freeing torch's, MLflow's and Ray's modules object by object took 1.4 s at 2 cores after
    every command, for nothing a finished command needs. What a normal exit runs first still
    runs: the threads that are not daemons are joined, then the atexit handlers (Ray's
    shutdown, MLflow's asynchronous logging, logging's flush), then the output is flushed.
    A bug's traceback leaves the usual way.
    """
    code = main()
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to tell
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    command()
