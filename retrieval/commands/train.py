"""`casebase train MANIFEST --out MODEL_DIR`."""

from __future__ import annotations

from retrieval.model.train import TrainOptions, train_model


def run(args) -> int:
    opts = TrainOptions(
        epochs=args.epochs,
        backbone=args.backbone,
        image_size=args.image_size,
        embedding_dim=args.embedding_dim,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        strict=args.strict,
    )
    # options the parser may not have (older parsers, scripted calls): keep the defaults
    for name in (
        "width",
        "depth",
        "loss",
        "temperature",
        "instance_weight",
        "aug_scale",
        "peak_weight",
        "peak_pool",
        "zero_init_residual",
        "extent_weight",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(opts, name, value)
    report = train_model(args.manifest, args.out, opts)
    best = report.best_val or {}
    print(
        f"trained {report.summary()} on {report.n_train} cases, validated on {report.n_val}: "
        f"val precision@1 {best.get('precision_at_1', float('nan')):.3f}, "
        f"accuracy {best.get('accuracy', float('nan')):.3f}; {report.seconds:.0f} s -> {args.out}"
    )
    opts_used = _loss_options(args.out)
    if opts_used.get("extent_weight", 0) > 0:
        print(
            f"lesion-extent head taught by {opts_used.get('n_masked', 0)} lesion masks: the "
            f"embedding weighs lesion size at {opts_used['extent_weight']:g} "
            "(--extent-weight 0 turns it off)"
        )
    if len(report.attempts) > 1:
        print(
            f"{len(report.attempts) - 1} restart(s) after training stalled at chance "
            f"(final learning rate {report.attempts[-1]['lr']:g})"
        )
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable image(s)")
    return 0


def _loss_options(model_dir) -> dict:
    """The trained model's recorded loss options ({} if its config cannot be read)."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg.get("training", {}).get("loss_options", {})
