"""The `raylt` command: `run`, `fit`, `ablate`, `embed`, `log`, `config`, `list`.

Errors caused by input (config, data, weights) print as one line, `raylt: error: ...`, and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from raylt import __version__
from raylt.errors import RayltError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (see configs/); defaults only if omitted")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. embed.batch_size=64")


def cmd_config(args) -> int:
    from raylt.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_embed(args) -> int:
    from raylt.config import load_config
    from raylt.embed import run_embed

    from raylt import tracking

    cfg = load_config(args.config, args.overrides)
    tracking.check_reachable(cfg)
    with tracking.start_run(cfg, "embed") as run:
        res = run_embed(cfg)
        if run is not None:
            tracking.log_embed(res)
    m = res.manifest
    how = "reused" if res.reused else f"{res.computed_rows} images in {res.seconds:.1f} s ({res.images_per_s:.0f} images/s)"
    print(f"store: {res.store}")
    print(f"embeddings: {m['embedded']} (D={m['dim']}), skipped: {m['skipped']}, {how}")
    if run is not None:
        print(f"mlflow: run {run.info.run_id} in {tracking.redact(tracking.tracking_uri(cfg))}")
    return 0


def _table(results) -> str:
    """Overall / many / medium / few of each fit, one row per recipe."""
    rows = ["| recipe | overall | many | medium | few |", "|---|---|---|---|---|"]
    for label, r in results:
        cells = [r.metrics.get(k) for k in ("overall", "many", "medium", "few")]
        rows.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")
    return "\n".join(rows)


def _report(cfg, results) -> None:
    from raylt import tracking
    from raylt.pipeline import recipe_label

    labels = [recipe_label(cfg), "baseline: CE head, real only"]
    print(_table(list(zip(labels, results))))
    for r in results:
        print(f"metrics: {r.out / 'metrics.json'}")
        if r.run_id and r.model_uri:
            print(f"mlflow: run {r.run_id} in {tracking.redact(tracking.tracking_uri(cfg))} (model {r.model_uri})")
        elif r.run_id:
            print(f"mlflow: run {r.run_id} is incomplete (the server was lost); `raylt log {r.out}` logs the results")


def cmd_run(args) -> int:
    from raylt.config import load_config
    from raylt.pipeline import run

    cfg = load_config(args.config, args.overrides)
    _report(cfg, run(cfg, baseline=args.baseline))
    return 0


def cmd_fit(args) -> int:
    from raylt.config import load_config
    from raylt.embeddings import open_embeddings
    from raylt.pipeline import baseline_config, fit

    cfg = load_config(args.config, args.overrides)
    es = open_embeddings(args.embeddings, args.class_names)
    out = Path(args.out).expanduser().resolve()
    results = [fit(cfg, es, out)]
    if args.baseline:
        results.append(fit(baseline_config(cfg), es, out / "baseline", run_name="baseline"))
    _report(cfg, results)
    return 0


def cmd_ablate(args) -> int:
    from raylt.ablation import ablate, markdown
    from raylt.config import expand_path, load_config, to_dict
    from raylt.embeddings import open_embeddings

    cfg = load_config(args.config, args.overrides)
    if args.embeddings:
        es, backbone = open_embeddings(args.embeddings, args.class_names), None
    else:
        from raylt.embed import run_embed

        es, backbone = open_embeddings(run_embed(cfg).store), to_dict(cfg.backbone)
    out = Path(args.out).expanduser().resolve() if args.out else expand_path(cfg.train.output_dir) / cfg.name / "ablation"
    names = [n.strip() for n in args.recipes.split(",") if n.strip()] if args.recipes else None
    rows = ablate(cfg, es, out, names, args.parallel, backbone)
    print(markdown(rows))
    print(f"report: {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0


def cmd_log(args) -> int:
    from raylt import tracking

    run_id, model_uri = tracking.log_saved(Path(args.out), args.tracking_uri)
    print(f"mlflow: run {run_id} (model {model_uri})")
    return 0


def _list_configs() -> list[str]:
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))


def cmd_list(args) -> int:
    from raylt.backbones import BACKBONES
    from raylt.data import SOURCES

    from raylt.adapter import ADAPTERS, BATCHES
    from raylt.auxiliary import MATCHERS
    from raylt.heads import HEADS, LOSSES
    from raylt.sampling import SAMPLERS
    from raylt.selection import SELECTORS

    sections = [("backbones", BACKBONES.describe()), ("data sources", SOURCES.describe()),
                ("samplers", SAMPLERS.describe()), ("heads", HEADS.describe()), ("losses", LOSSES.describe()),
                ("selectors (selection.name)", SELECTORS.describe()), ("adapters (adapter.name)", ADAPTERS.describe()),
                ("adapter batches (adapter.batches)", BATCHES.describe()),
                ("auxiliary matchers (auxiliary.match)", MATCHERS.describe())]
    for title, rows in sections:
        print(f"{title}:")
        for name, help in rows:
            print(f"  {name:<12} {help}")
    if args.models:
        import open_clip

        from raylt.backbones import _register_model_configs

        _register_model_configs(None)
        print("open_clip architectures (backbone.model):")
        print("  " + " ".join(open_clip.list_models()))
        print("open_clip pretrained tags (backbone.model / backbone.pretrained):")
        for model, tag in open_clip.list_pretrained():
            print(f"  {model} / {tag}")
    configs = _list_configs()
    if configs:
        print(f"configs ({CONFIG_DIR}):")
        for c in configs:
            print(f"  {c}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylt", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"raylt {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="the whole pipeline: embed, class stats, sampler, head (Ray Train), evaluation")
    _config_args(p)
    p.add_argument("--baseline", action="store_true", help="also fit the plain CE head on real embeddings and compare")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("fit", help="fit and evaluate a head on precomputed embeddings (Parquet or a store)")
    p.add_argument("--embeddings", required=True, help="Parquet file or folder (embedding, label, split) or a store")
    p.add_argument("--out", required=True, help="output folder: metrics.json, per_class.png, head, checkpoints")
    p.add_argument("--config", help="YAML config (see configs/); defaults if omitted")
    p.add_argument("--class-names", help="text file, one class name per line in label order")
    p.add_argument("--baseline", action="store_true", help="also fit the plain CE head on real embeddings and compare")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. sampler.target=200")
    p.set_defaults(fn=cmd_fit)
    p = sub.add_parser("ablate", help="every long-tail method on the same embeddings, side by side (MLflow child runs)")
    _config_args(p)
    p.add_argument("--embeddings", help="Parquet file or folder or a store; default: embed the config's data set")
    p.add_argument("--class-names", help="text file, one class name per line in label order")
    p.add_argument("--out", help="output folder (default: <train.output_dir>/<name>/ablation)")
    p.add_argument("--recipes", help="comma-separated subset, e.g. ce,default,ip_dpp (default: all, then best)")
    p.add_argument("--parallel", type=int, default=0, help="fits at once (default: as many as the CPUs hold)")
    p.set_defaults(fn=cmd_ablate)
    p = sub.add_parser("embed", help="embed a data set into the embedding store (Ray Data)")
    _config_args(p)
    p.set_defaults(fn=cmd_embed)
    p = sub.add_parser("log", help="log a finished fit's output folder to MLflow (after the server was lost)")
    p.add_argument("out", help="the fit's output folder (metrics.json, run.json, head.npz)")
    p.add_argument("--tracking-uri", help="log to this server instead of the one the fit used")
    p.set_defaults(fn=cmd_log)
    p = sub.add_parser("config", help="print the resolved config as YAML")
    _config_args(p)
    p.set_defaults(fn=cmd_config)
    p = sub.add_parser("list", help="registered backbones, data sources and shipped configs")
    p.add_argument("--models", action="store_true", help="also list open_clip architectures and pretrained tags")
    p.set_defaults(fn=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = getattr(args, "config", None)
    if config and "=" in config and not Path(config).exists():  # no config file, only overrides
        args.config, args.overrides = None, [config, *args.overrides]
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quiet:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.fn(args)
    except RayltError as e:
        print(f"raylt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raylt: interrupted; finished shards are kept and a re-run continues from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
