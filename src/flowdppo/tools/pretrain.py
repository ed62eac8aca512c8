"""Flow-matching pretraining of the embedded shapes model (how the shipped weights were made).

Data: fresh ``(prompt, scene)`` pairs of every category of the shapes world's *train* split
(``sample_prompt(rng, category, "train")`` -> ``scene_for_prompt`` -> ``render``), categories drawn
uniformly; 10% of the prompts are replaced by ``""`` so that classifier-free guidance works.

Objective: rectified flow ``x_t = (1 - t) x0 + t eps``, target ``eps - x0`` (MSE), the network
called at ``timestep = 1000 t``. ``t`` is drawn logit-normal (``sigmoid(N(0, 1))``, SD3's choice)
mixed with 10% uniform draws so the ends of the schedule (``t`` near 1, where composition is
decided, and near 0) are also trained. AdamW, linear warm-up, a constant learning rate, then
(``cooldown``) a linear decay to 0 over the last steps (a warm-up/stable/decay schedule); grad clip 1;
an EMA of the weights.

Checkpoints: every ``ckpt_every`` steps ``<ckpt_dir>/step_XXXXXXX/`` (a loadable model folder of the
EMA weights) and ``<ckpt_dir>/last.pt`` (weights, EMA, optimizer, step, data RNG) for ``--resume``;
a resumed run continues the same data stream, so stopping and resuming gives the same run as one
call. The final model goes to ``out_dir`` (``config.json`` + fp16 ``model.safetensors``): the raw
weights when the schedule cools down to 0 (they beat the EMA there, which still averages the
high-lr phase), else the EMA (``ship``). It is then evaluated: 10-step Euler ODE samples of the
held-out ``eval`` prompts, scored by ``score_batch``, strict accuracy per category and overall.

    # the shipped weights (see models/README.md)
    python -m flowdppo.tools.pretrain --out src/flowdppo/assets/shapes_model --ckpt-dir runs/pretrain/ckpt \
        --steps 15500 --cooldown 3500 --seed 0
    python -m flowdppo.tools.pretrain --eval-only --out runs/pretrain/ckpt/step_0006000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdppo.models.shapes_model import ShapesFlowModel

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ data


def make_batch(
    rng: np.random.Generator,
    batch_size: int,
    p_uncond: float = 0.1,
    categories: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """``batch_size`` fresh train-split pairs: prompts (``""`` with prob ``p_uncond``) and
    ``x0 [B, 3, 32, 32]`` in [-1, 1]. Categories are drawn uniformly, or in proportion to ``weights``."""
    from flowdppo.worlds import shapes

    cats = list(categories or shapes.CATEGORIES)
    probs = None
    if weights is not None:
        if len(weights) != len(cats) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"category weights {list(weights)} must be {len(cats)} non-negative numbers, not all 0")
        probs = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    prompts, images = [], []
    for _ in range(batch_size):
        cat = cats[int(rng.integers(len(cats)))] if probs is None else cats[int(rng.choice(len(cats), p=probs))]
        prompt = shapes.sample_prompt(rng, cat, "train")
        scene = shapes.scene_for_prompt(prompt, rng)
        images.append(shapes.render(scene))
        prompts.append("" if rng.random() < p_uncond else prompt.text)
    x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0
    return prompts, x0.contiguous()


def parse_category_weights(text: str | None) -> list[float] | None:
    """``"position=2,color_attr=2"`` -> a weight per ``shapes.CATEGORIES`` entry (unnamed ones 1.0)."""
    from flowdppo.worlds import shapes

    if not text:
        return None
    w = dict.fromkeys(shapes.CATEGORIES, 1.0)
    for item in text.split(","):
        name, _, val = item.partition("=")
        name = name.strip()
        if name not in w or not val:
            raise ValueError(
                f"--category-weights item {item!r}: expected CATEGORY=WEIGHT with CATEGORY in {', '.join(w)}"
            )
        w[name] = float(val)
    return list(w.values())


def sample_t(n: int, generator: torch.Generator, dist: str = "logit-normal", p_uniform: float = 0.1) -> torch.Tensor:
    """Flow times ``[n]`` in (0, 1): ``"logit-normal"`` (sigmoid of N(0,1), a ``p_uniform`` share
    uniform) or ``"uniform"``."""
    u = torch.rand(n, generator=generator)
    if dist == "uniform":
        return u
    if dist != "logit-normal":
        raise ValueError(f"unknown t distribution {dist!r}; valid: logit-normal, uniform")
    t = torch.sigmoid(torch.randn(n, generator=generator))
    use_u = torch.rand(n, generator=generator) < p_uniform
    return torch.where(use_u, u, t)


def lr_factor(step: int, steps: int, warmup: int, cooldown: int) -> float:
    """Warm-up / constant / linear cool-down to 0 over the last ``cooldown`` of ``steps`` (a WSD schedule)."""
    f = min(1.0, (step + 1) / max(1, warmup))
    if cooldown > 0:
        f = min(f, max(0.0, (steps - step) / cooldown))
    return f


# ------------------------------------------------------------------------------------------ eval


@torch.no_grad()
def evaluate(
    model: ShapesFlowModel,
    prompts: Sequence[Any] | None = None,
    samples_per_prompt: int = 1,
    num_steps: int = 10,
    guidance_scale: float = 1.0,
    seed: int = 0,
    schedule: str = "model",
    grid_path: str | os.PathLike | None = None,
    grid_prompts: int = 12,
    grid_seeds: int = 8,
) -> dict[str, Any]:
    """Strict / soft accuracy of 10-step Euler ODE samples on the held-out ``eval`` prompts.

    ``prompts``: shapes ``Prompt`` objects (default ``prompt_sets(seed=0)["eval"]``, what the trainer
    evaluates). Returns ``{"overall": strict over all samples, "overall_soft", "macro": mean over
    categories, "per_category": {cat: strict}, "n": samples}``; optionally writes a PNG grid.
    """
    from flowdppo.rewards import shapes_reward
    from flowdppo.training.evaluation import Evaluator
    from flowdppo.worlds import shapes
    from flowdppo.worlds.world import ShapesWorld

    model.module.eval()
    if prompts is None:
        prompts = shapes.prompt_sets(seed=0)["eval"]
    # the trainer's evaluator: fixed-noise Euler ODE samples, the shapes reward, the world's per-category breakdown
    ev = Evaluator(
        model,
        model.sigmas(num_steps, schedule),
        lambda ps: model.encode_prompts(ps, guidance_scale),
        shapes_reward(),
        {"eval": [p.text for p in prompts]},
        ShapesWorld().breakdown,
        samples_per_prompt=samples_per_prompt,
        seed=seed,
        guidance_scale=guidance_scale,
        batch_size=256,
    )
    r = ev.evaluate()
    per_cat = {c: r[f"eval/eval/strict/{c}"] for c in shapes.CATEGORIES if f"eval/eval/strict/{c}" in r}
    res = {
        "overall": r["eval/eval/strict"],
        "overall_soft": r["eval/eval/soft"],
        "macro": float(np.mean(list(per_cat.values()))),
        "per_category": per_cat,
        "n": len(prompts) * samples_per_prompt,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    if grid_path is not None:
        by_cat: dict[str, list[Any]] = {}
        for p in prompts:
            by_cat.setdefault(p.category, []).append(p)
        picked: list[Any] = []
        while len(picked) < grid_prompts and any(by_cat.values()):
            for c in list(by_cat):
                if by_cat[c] and len(picked) < grid_prompts:
                    picked.append(by_cat[c].pop(0))
        ev.grid(Path(grid_path), n_seeds=grid_seeds, prompts=[p.text for p in picked])
    return res


def order_metrics(model: ShapesFlowModel, samples_per_prompt: int = 4, seed: int = 0) -> dict[str, float]:
    """Does the model follow word order? On the held-out ``position`` and ``color_attr`` prompts:

    - ``position_order``: of the samples in which both named shapes are detected (any colour), the share in
      which some pair satisfies the relation; ``position_reversed``: the share in which only the *reversed*
      relation holds (a bag-of-words model draws its training twin's layout: high here);
    - ``binding``: of the ``color_attr`` samples with both named shapes detected and coloured, the share in
      which both bindings are right; ``binding_swapped``: the share with the two colours exchanged;
    - ``swap_sensitivity``: ``|v(prompt) - v(swapped prompt)| / |v(prompt) - v("")|`` at sigma 0.9 on the
      same noise, averaged over the position prompts (0 = the model cannot tell "a A left of a B" from
      "a B left of a A").
    """
    from flowdppo.worlds import shapes

    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    model.module.eval()
    out: dict[str, float] = {}
    pos = list(shapes.prompt_pool("position", "eval"))
    rows = [p for p in pos for _ in range(samples_per_prompt)]
    imgs = model.generate([p.text for p in rows], generator=torch.Generator().manual_seed(seed))
    both = right = rev = 0
    for p, sc in zip(rows, shapes.score_batch(rows, imgs)):
        a, b = p.shapes
        da = [d for d in sc.detections if d.shape == a]
        db = [d for d in sc.detections if d.shape == b]
        if not (da and db):
            continue
        both += 1
        ok, bad = (
            any(shapes.relation_holds((x.cx, x.cy, x.size), (y.cx, y.cy, y.size), r) for x in da for y in db)
            for r in (p.relation, opposite[p.relation])
        )
        right += ok
        rev += bad and not ok
    out["position_both_drawn"] = both / max(len(rows), 1)
    out["position_order"] = right / max(both, 1)
    out["position_reversed"] = rev / max(both, 1)
    ca = list(shapes.prompt_pool("color_attr", "eval"))
    rows = [p for p in ca for _ in range(samples_per_prompt)]
    imgs = model.generate([p.text for p in rows], generator=torch.Generator().manual_seed(seed + 1))
    both = right = swapped = 0
    for p, sc in zip(rows, shapes.score_batch(rows, imgs)):
        (s1, s2), (c1, c2) = p.shapes, p.colors
        d1 = {d.color for d in sc.detections if d.shape == s1 and d.color}
        d2 = {d.color for d in sc.detections if d.shape == s2 and d.color}
        if not (d1 and d2):
            continue
        both += 1
        right += c1 in d1 and c2 in d2
        swapped += c2 in d1 and c1 in d2 and not (c1 in d1 and c2 in d2)
    out["binding"] = right / max(both, 1)
    out["binding_swapped"] = swapped / max(both, 1)
    texts = [p.text for p in pos]
    swaps = [f"a {p.shapes[1]} {shapes.RELATIONS[p.relation]} a {p.shapes[0]}" for p in pos]
    with torch.no_grad():
        x = torch.randn((len(texts), *model.latent_shape), generator=torch.Generator().manual_seed(seed + 2))
        sig = torch.full((len(texts),), 0.9)
        v = model.velocity(x, sig, model.encode_prompts(texts))
        v_s = model.velocity(x, sig, model.encode_prompts(swaps))
        v_u = model.velocity(x, sig, model.encode_prompts([""] * len(texts)))
        num = (v - v_s).flatten(1).norm(dim=1)
        den = (v - v_u).flatten(1).norm(dim=1).clamp(min=1e-6)
    out["swap_sensitivity"] = float((num / den).mean())
    return out


def format_eval(res: dict[str, Any]) -> str:
    lines = [f"strict accuracy ({res['n']} samples, {res['num_steps']} Euler steps, cfg {res['guidance_scale']}):"]
    for c, a in res["per_category"].items():
        lines.append(f"  {c:15s} {a:6.1%}")
    lines.append(
        f"  {'overall':15s} {res['overall']:6.1%}   (macro {res['macro']:.1%}, soft {res['overall_soft']:.1%})"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ training


def _ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for n, p in module.state_dict().items():
            if p.is_floating_point():
                ema[n].mul_(decay).add_(p.detach(), alpha=1.0 - decay)
            else:
                ema[n].copy_(p)


def _model_with(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> ShapesFlowModel:
    m = ShapesFlowModel.from_config(cfg, seed=0)
    m.module.load_state_dict(state)
    return m


def pretrain(
    out_dir: str | os.PathLike,
    steps: int = 12000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    model_config: dict[str, Any] | None = None,
    ckpt_dir: str | os.PathLike | None = None,
    ckpt_every: int = 1000,
    ema_decay: float = 0.999,
    p_uncond: float = 0.1,
    t_dist: str = "logit-normal",
    warmup: int = 300,
    cooldown: int = 0,
    ship: str = "auto",
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    resume: bool = False,
    init_from: str | os.PathLike | None = None,
    init_parts: str = "all",
    category_weights: Sequence[float] | None = None,
    eval_every: int = 0,
    eval_every_samples: int = 2,
    max_minutes: float | None = None,
    threads: int | None = 2,
    eval_samples_per_prompt: int = 2,
    eval_guidance: Sequence[float] = (1.0,),
    grid: bool = True,
    log_every: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Pretrain a shapes model from scratch; write the EMA weights to ``out_dir`` and evaluate them.

    ``steps`` optimizer steps of ``batch_size`` fresh pairs (``max_minutes`` stops earlier, counted
    from the start of this call). ``ckpt_dir`` defaults to ``<out_dir>/../<name>-ckpt`` under ``runs/``
    semantics: pass it explicitly to keep checkpoints outside the package. Returns the evaluation
    (``{guidance: eval dict}`` under ``"eval"``) plus ``steps``, ``wall_s``.
    """
    from tqdm.auto import tqdm

    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else out_dir.parent / f"{out_dir.name}-ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    model = ShapesFlowModel.from_config(model_config, seed=seed)
    net = model.module
    if init_from is not None:
        if init_parts not in ("all", "transformer"):
            raise ValueError(f"init_parts must be 'all' or 'transformer', got {init_parts!r}")
        src = ShapesFlowModel.from_pretrained(init_from).module
        if init_parts == "all":
            net.load_state_dict(src.state_dict())
        else:  # keep the fresh text encoder (e.g. a new architecture), warm-start the image transformer
            net.transformer.load_state_dict(src.transformer.state_dict())
        log.info("initialised %s from %s", init_parts, init_from)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    ema = {n: v.detach().clone() for n, v in net.state_dict().items()}
    rng = np.random.default_rng(seed)
    tgen = torch.Generator().manual_seed(seed + 1)
    step, prior_wall = 0, 0.0
    last = ckpt_dir / "last.pt"
    if resume and last.exists():
        st = torch.load(last, map_location="cpu", weights_only=False)
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        rng.bit_generator.state = st["rng"]
        tgen.set_state(st["tgen"])
        step, prior_wall = st["step"], st.get("wall_s", 0.0)
        log.info("resumed from %s at step %d", last, step)
    n_params = sum(p.numel() for p in net.parameters())
    log.info(
        "shapes model: %.2fM parameters, config %s",
        n_params / 1e6,
        {k: v for k, v in model.config.items() if k != "vocab"},
    )

    def save_ckpt() -> None:
        _model_with(ema, model.config).save_pretrained(ckpt_dir / f"step_{step:07d}", extra={"step": step})
        tmp = ckpt_dir / "last.pt.tmp"
        torch.save(
            {
                "model": net.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema,
                "rng": rng.bit_generator.state,
                "tgen": tgen.get_state(),
                "step": step,
                "wall_s": prior_wall + time.time() - t_start,
            },
            tmp,
        )
        os.replace(tmp, last)

    def periodic_eval() -> None:
        """Held-out strict accuracy per category and the word-order diagnostics of the EMA weights,
        logged and appended to ``<ckpt_dir>/evals.jsonl``."""
        t0 = time.time()
        m = _model_with(ema, model.config)
        res = evaluate(m, samples_per_prompt=eval_every_samples, seed=seed)
        order = order_metrics(m, seed=seed)
        rec = {
            "step": step,
            "weights": "ema",
            "wall_s": round(prior_wall + time.time() - t_start, 1),
            "loss": loss_avg,
            "lr": opt.param_groups[0]["lr"],
            "overall": res["overall"],
            "per_category": res["per_category"],
            **order,
            "eval_s": round(time.time() - t0, 1),
        }
        with open(ckpt_dir / "evals.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        cats = " ".join(f"{c[:6]} {a:.0%}" for c, a in res["per_category"].items())
        log.info(
            "eval step %d: overall %.1f%% | %s | pos order %.0f%% (reversed %.0f%%), binding %.0f%% (swapped %.0f%%), "
            "swap sensitivity %.3f",
            step,
            100 * res["overall"],
            cats,
            100 * order["position_order"],
            100 * order["position_reversed"],
            100 * order["binding"],
            100 * order["binding_swapped"],
            order["swap_sensitivity"],
        )

    bar = tqdm(total=steps, initial=step, disable=not progress, desc="pretrain", dynamic_ncols=True, mininterval=5)
    loss_avg, data_s, model_s = None, 0.0, 0.0
    if eval_every and step == 0:
        periodic_eval()
    while step < steps:
        if max_minutes is not None and time.time() - t_start > 60.0 * max_minutes:
            log.info("time limit of %.1f min reached at step %d", max_minutes, step)
            break
        t0 = time.perf_counter()
        prompts, x0 = make_batch(rng, batch_size, p_uncond, weights=category_weights)
        t1 = time.perf_counter()
        eps = torch.randn(x0.shape, generator=tgen)
        t = sample_t(batch_size, tgen, t_dist)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        ids = net.text_encoder.ids(prompts)
        ehs, pooled = net.text_encoder(ids)
        v = net(xt, t, ehs, pooled)
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, warmup, cooldown)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        opt.step()
        step += 1
        _ema_update(ema, net, min(ema_decay, (1 + step) / (10 + step)))
        t2 = time.perf_counter()
        data_s += t1 - t0
        model_s += t2 - t1
        loss_val = loss.item()
        loss_avg = loss_val if loss_avg is None else 0.98 * loss_avg + 0.02 * loss_val
        bar.update(1)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            log.info(
                "step %d loss %.4f (data %.0f ms, model %.0f ms per step)",
                step,
                loss_avg,
                1000 * data_s / log_every,
                1000 * model_s / log_every,
            )
            data_s = model_s = 0.0
        if step % ckpt_every == 0:
            save_ckpt()
        if eval_every and step % eval_every == 0:
            periodic_eval()
    bar.close()
    save_ckpt()
    wall = prior_wall + time.time() - t_start
    if ship == "auto":
        ship = "raw" if cooldown > 0 else "ema"
    if ship not in ("raw", "ema"):
        raise ValueError(f"ship must be auto, raw or ema, got {ship!r}")
    final = _model_with(ema if ship == "ema" else net.state_dict(), model.config)
    final.save_pretrained(
        out_dir,
        extra={
            "weights": ship,
            "step": step,
            "train": {
                "steps": step,
                "batch_size": batch_size,
                "lr": lr,
                "seed": seed,
                "t_dist": t_dist,
                "ema_decay": ema_decay,
                "warmup": warmup,
                "cooldown": cooldown,
                "p_uncond": p_uncond,
                "init_from": str(init_from) if init_from is not None else None,
                "init_parts": init_parts if init_from is not None else None,
                "category_weights": list(category_weights) if category_weights is not None else None,
                "wall_s": round(wall, 1),
            },
        },
    )
    log.info("saved %s (%s weights) after %d steps, %.1f min", out_dir, ship, step, wall / 60)
    final = ShapesFlowModel.from_pretrained(out_dir)  # evaluate exactly what was written (fp16)
    result: dict[str, Any] = {"steps": step, "wall_s": wall, "params": n_params, "eval": {}}
    for g in eval_guidance:
        res = evaluate(
            final,
            samples_per_prompt=eval_samples_per_prompt,
            guidance_scale=g,
            seed=seed,
            grid_path=(ckpt_dir / f"samples_cfg{g:g}.png") if grid else None,
        )
        result["eval"][g] = res
        print(format_eval(res), flush=True)
    (ckpt_dir / "eval.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flowdppo pretrain", description="Pretrain the embedded shapes model.")
    p.add_argument("--out", required=True, help="output model folder (config.json + model.safetensors)")
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", help="checkpoints (default <out>-ckpt next to --out)")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--cooldown", type=int, default=0, help="linear lr decay to 0 over the last N steps")
    p.add_argument(
        "--ship",
        default="auto",
        choices=["auto", "raw", "ema"],
        help="weights written to --out: auto = raw when --cooldown > 0 (annealed to lr 0), else EMA",
    )
    p.add_argument("--t-dist", default="logit-normal", choices=["logit-normal", "uniform"])
    p.add_argument("--max-minutes", type=float, help="stop after this much wall time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from <ckpt-dir>/last.pt")
    p.add_argument("--init-from", help="start from this model folder's weights (ignored when --resume finds last.pt)")
    p.add_argument(
        "--init-parts",
        default="all",
        choices=["all", "transformer"],
        help="with --init-from: load everything, or only the image transformer (fresh text encoder)",
    )
    p.add_argument("--category-weights", help="e.g. position=1.5,color_attr=1.5 (relative draw weights; unnamed = 1)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate the EMA weights every N steps (0 = never)")
    p.add_argument("--eval-every-samples", type=int, default=2, help="samples per held-out prompt there")
    p.add_argument("--config", help="JSON dict of model config overrides (see shapes_model.DEFAULT_CONFIG)")
    p.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt")
    p.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0])
    p.add_argument("--eval-only", action="store_true", help="only evaluate the model in --out")
    p.add_argument("--grid", help="with --eval-only: write a sample grid PNG here")
    p.add_argument(
        "--split",
        default="eval",
        choices=["eval", "train", "ood"],
        help="with --eval-only: which prompt_sets(seed=0) list to score",
    )
    p.add_argument("--order", action="store_true", help="with --eval-only: also print the word-order diagnostics")
    p.add_argument("--log-every", type=int, default=100, help="log the loss every N steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.eval_only:
        if a.threads:
            torch.set_num_threads(a.threads)
        from flowdppo.worlds import shapes

        model = ShapesFlowModel.from_pretrained(a.out)
        for g in a.eval_guidance:
            grid = a.grid
            if grid and len(a.eval_guidance) > 1:
                grid = str(Path(grid).with_name(f"{Path(grid).stem}_cfg{g:g}{Path(grid).suffix}"))
            prompts = None if a.split == "eval" else shapes.prompt_sets(seed=0)[a.split]
            res = evaluate(
                model, prompts, samples_per_prompt=a.eval_samples, guidance_scale=g, seed=a.seed, grid_path=grid
            )
            print(f"[{a.split} prompts]")
            print(format_eval(res), flush=True)
        if a.order:
            print("word order:", json.dumps({k: round(v, 3) for k, v in order_metrics(model, seed=a.seed).items()}))
        return 0
    pretrain(
        a.out,
        a.steps,
        a.batch_size,
        a.lr,
        a.seed,
        model_config=json.loads(a.config) if a.config else None,
        ckpt_dir=a.ckpt_dir,
        ckpt_every=a.ckpt_every,
        ema_decay=a.ema_decay,
        warmup=a.warmup,
        cooldown=a.cooldown,
        ship=a.ship,
        t_dist=a.t_dist,
        max_minutes=a.max_minutes,
        threads=a.threads,
        resume=a.resume,
        init_from=a.init_from,
        init_parts=a.init_parts,
        category_weights=parse_category_weights(a.category_weights),
        eval_every=a.eval_every,
        eval_every_samples=a.eval_every_samples,
        eval_samples_per_prompt=a.eval_samples,
        eval_guidance=a.eval_guidance,
        log_every=a.log_every,
        progress=not a.quiet,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
