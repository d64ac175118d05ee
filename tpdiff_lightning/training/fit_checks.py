"""Startup checks for training settings that cannot work together, so a run stops before its first step
(with one line naming the settings) instead of at step 1 or hours in.

Combinations the project makes work rather than refuses: the fused AdamW with gradient clipping under bf16
(``tpdiff_lightning.training.gradient_clipping``), DeepSpeed's micro-batch size from the data
(``tpdiff_lightning.distributed.deepspeed``), and T5's tied token embedding under FSDP(1) (registered once, see
``tpdiff_lightning.models.text_encoder``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tpdiff_lightning.training.gradient_clipping import strategy_kind, uses_gradient_scaler


def shared_parameters(module: nn.Module, trainable_only: bool = True) -> list[list[str]]:
    """Groups of names under which one parameter is registered more than once (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad or not trainable_only:
            names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def deepspeed_stage(strategy: Any) -> int | None:
    config = getattr(strategy, "config", None) or {}
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return int(stage) if stage is not None else None


def fit_setup_problems(trainer: Any, module: Any, data: Any = None) -> list[str]:
    """One message per unsupported combination of ``trainer``, the TPDiffModule ``module`` settings and the data
    module ``data`` (default: the trainer's)."""
    hp = module.settings.optimization
    kind = strategy_kind(trainer.strategy)
    precision = str(trainer.precision)
    clip = trainer.gradient_clip_val or 0.0
    algorithm = str(getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm")
    problems = []
    if hp.fused_optimizer is True:
        if kind == "deepspeed":
            problems.append("model.init_args.optimization.fused_optimizer=true cannot run with DeepSpeed, which wraps the optimizer "
                            "itself; expected null (auto) or false")
        elif uses_gradient_scaler(trainer.precision_plugin) and clip > 0:
            problems.append(f"model.init_args.optimization.fused_optimizer=true cannot run with trainer.precision={precision} and "
                            f"trainer.gradient_clip_val={clip}: the fused AdamW unscales fp16 gradients inside its "
                            "step, after clipping would have seen them scaled; expected null (auto) or false, "
                            "bf16-mixed, or no clipping")
    if kind == "deepspeed":
        if clip > 0 and algorithm == "value":
            problems.append("trainer.gradient_clip_algorithm=value cannot run with DeepSpeed, which clips by norm "
                            "only; expected norm")
        if deepspeed_stage(trainer.strategy) == 3 and hp.ema_decay is not None:
            problems.append(f"model.init_args.optimization.ema_decay={hp.ema_decay} cannot run with DeepSpeed ZeRO stage 3: each "
                            "rank holds empty parameter placeholders outside forward, so there is nothing to "
                            "average; expected null (or use configs/strategy/fsdp2.yaml, which keeps the EMA)")
    if kind == "fsdp1":
        if hp.ema_decay is not None:
            problems.append(f"model.init_args.optimization.ema_decay={hp.ema_decay} cannot run with FSDP(1) "
                            "(configs/strategy/fsdp.yaml): it flattens and renames the weights the EMA follows; "
                            "expected null, or configs/strategy/fsdp2.yaml, which keeps the EMA")
        if precision not in ("32-true", "32", "64-true", "64"):
            tied = shared_parameters(module)
            if tied:
                listed = "; ".join(" = ".join(group) for group in tied)
                problems.append(f"FSDP(1) with trainer.precision={precision} cannot train a parameter registered "
                                f"under two names ({listed}): its mixed precision cannot assign the shared "
                                "gradient; register the tied module once, or use configs/strategy/fsdp2.yaml")
    problems.extend(context_parallel_problems(trainer.strategy, module))
    problems.extend(batch_plan_problems(trainer, module, data if data is not None else
                                        getattr(trainer, "datamodule", None)))
    return problems


def batch_plan_problems(trainer: Any, module: Any, data: Any) -> list[str]:
    """Why this run's buckets or token budget cannot be trained, if they cannot: a bucket the pyramid does not
    fit (one line naming it), a latent cache its buckets do not cover, or global alignment, which needs equal
    batches on every rank."""
    buckets, budget = getattr(data, "buckets", None), getattr(data, "token_budget", None)
    if buckets is None and budget is None:
        return latent_bucket_problems(data, None)
    problems = []
    try:
        plan = data.batch_plan(module)
    except ValueError as error:
        problems.append(str(error))
    else:
        problems.extend(latent_bucket_problems(data, [str(b) for b in plan.stage_tokens]))
    strategy = trainer.strategy
    world = getattr(strategy, "num_nodes", 1) * getattr(strategy, "num_processes", 1)
    if module.settings.objective.alignment_scope == "global" and module.settings.objective.alignment and world > 1:
        problems.append("model.init_args.objective.alignment_scope=global cannot run with data.init_args.buckets or "
                        "token_budget on several processes: their batches differ in size and shape between ranks; "
                        "expected local")
    return problems


def latent_bucket_problems(data: Any, buckets: list[str] | None) -> list[str]:
    """Why the latent cache the run trains from cannot feed batches of ``buckets`` (``"FxHxW"``; None: one fixed
    shape, ``num_frames`` x ``resolution``), if it cannot: its manifest counts the clips of each shape it was
    encoded at."""
    if data is None or not hasattr(data, "resolved_format") or getattr(data, "train_shards", None) is not None:
        return []  # no data module, or shards named by a pattern: no manifest to read
    from tpdiff_lightning.data.frame_size import frame_size
    from tpdiff_lightning.data.latent_cache import LATENT_FORMAT
    from tpdiff_lightning.data.synthetic import read_manifest

    if data.resolved_format() != LATENT_FORMAT:
        return []
    train = ((read_manifest(data.root) or {}).get("splits") or {}).get("train") or {}
    encoded = train.get("buckets")
    key, where = "data.init_args.buckets", f"the latent shards at {data.root}"
    if buckets is None:
        if encoded is None:
            return []  # an older single-shape cache: the module checks each batch's size
        if len(encoded) > 1:
            return [f"{key}=null, but {where} were encoded per bucket ({', '.join(encoded)}); expected {key} "
                    "listing those shapes"]
        (shape,) = encoded
        size = tuple(int(v) for v in shape.split("x")[1:])
        if size != frame_size(data.resolution):
            return [f"data.init_args.resolution={data.resolution!r}, but {where} were encoded at "
                    f"{size[0]}x{size[1]}; expected resolution {list(size)}, or shards re-encoded at this resolution"]
        return []
    if data.buckets is not None:
        setting = f"{key}={[[b.frames, b.height, b.width] for b in data.buckets]}"
    else:
        setting = f"data.init_args.token_budget={data.token_budget} (one shape, {buckets[0]})"
    if encoded is None:
        return [f"{setting} needs {where} to name each clip's bucket, but they were encoded without (an older "
                "data/encode_latents.py); expected shards re-encoded with `python data/encode_latents.py`"]
    uncovered = [shape for shape in encoded if shape not in buckets]
    if uncovered:
        return [f"{setting} does not cover {where}: {', '.join(uncovered)} "
                f"({sum(encoded[u] for u in uncovered)} clips) were encoded at shapes it lacks; expected buckets "
                f"including {', '.join(encoded)}, or shards re-encoded with these buckets"]
    return []


def context_parallel_problems(strategy: Any, module: Any) -> list[str]:
    """Why ``FSDP2Strategy(context_parallel_size=...)`` cannot split this run's clips, if it cannot."""
    degree = getattr(strategy, "context_parallel_size", 1)
    if degree == 1:
        return []
    key = "trainer.strategy.init_args.context_parallel_size"
    problems = []
    if not hasattr(module.backbone, "token_split"):
        problems.append(f"{key}={degree} needs a backbone that splits its tokens over ranks (the built-in DiT, the "
                        f"Flux-style DiT or Wan); {type(module.backbone).__name__} does not; expected 1")
    heads = sorted({m.heads for m in module.backbone.modules() if isinstance(getattr(m, "heads", None), int)})
    odd = [h for h in heads if h % degree]
    if getattr(strategy, "context_parallel_attention", "auto") == "ulysses" and odd:
        problems.append(f"trainer.strategy.init_args.context_parallel_attention='ulysses' needs the degree {degree} "
                        f"to divide the backbone's attention heads ({odd[0]}); expected auto, ring or gathered")
    world = getattr(strategy, "num_nodes", 1) * getattr(strategy, "num_processes", 1)
    if world % degree:
        problems.append(f"{key}={degree} does not divide the {world} processes (trainer.devices x "
                        "trainer.num_nodes); expected a divisor of the world size")
    return problems


def check_fit_setup(trainer: Any, module: Any, data: Any = None) -> None:
    """Raise ValueError (one line per problem) when ``fit_setup_problems`` finds any."""
    problems = fit_setup_problems(trainer, module, data)
    if problems:
        raise ValueError("; ".join(problems))
