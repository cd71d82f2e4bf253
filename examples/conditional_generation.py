"""Class-conditional generation of handwritten digits with classifier guidance (Song et al. 2021, section 5).

On scikit-learn's bundled 8x8 digits (1,797 images, 17 grey levels, no download) this script
  1. trains a score model (a small U-Net, VP SDE, denoising score matching) and a noise-conditional classifier
     p_t(y | x_t) on the training split, plus an independent clean classifier used only for evaluation;
  2. samples the requested digits with classifier guidance and saves a PNG grid (and an unguided grid);
  3. prints the fraction of guided samples the clean classifier assigns to the requested digit (against unguided
     samples), held-out bits/dim (when sdegen.log_likelihood is available), a Frechet distance in the clean
     classifier's feature space, and saves an inpainting figure (top half known, bottom half filled in).

Checkpoints are cached in --cache-dir, so a second run skips training. Under torchrun the training runs with
DistributedDataParallel and the sampling and bits/dim are split over the processes; rank 0 prints and writes.

    python examples/conditional_generation.py --digits 0,3,7 --scale 2 --sampler reverse_diffusion --steps 200
    torchrun --nproc_per_node=2 examples/conditional_generation.py --digits 0,3,7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import matplotlib
import torch

import sdegen

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LEVELS = 17  # the digits hold grey levels 0..16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits to generate")
    p.add_argument("--per-digit", type=int, default=40, help="guided samples per requested digit")
    p.add_argument("--scale", type=float, default=2.0, help="classifier-guidance scale (>= 0)")
    p.add_argument("--sampler", default="reverse_diffusion", help="any fixed-step sampler name of sdegen.sample")
    p.add_argument("--steps", type=int, default=200, help="sampler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"))
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (default: <out>/cache)")
    p.add_argument("--train-steps", type=int, default=2000, help="score-model training steps")
    p.add_argument("--classifier-steps", type=int, default=None, help="noise-conditional classifier steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=32, help="U-Net base channels")
    p.add_argument("--bpd-count", type=int, default=128, help="test images for bits/dim (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data
def load_data(seed: int = 0):
    """Digits as levels n in {0..16} (N, 1, 8, 8) int64 and labels, split 80/20 with a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    n = torch.as_tensor(d.images, dtype=torch.int64)[:, None]
    y = torch.as_tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(n.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = n.shape[0] // 5
    test, train = perm[:n_test], perm[n_test:]
    return (n[train], y[train]), (n[test], y[test])


def on_grid(n: torch.Tensor) -> torch.Tensor:
    """Levels -> [-1, 1] on the grid -1 + 2 n / 16 (what sdegen.likelihood expects for levels=17)."""
    return -1.0 + 2.0 * n.float() / (LEVELS - 1)


def dequantized(n: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform dequantization -1 + 2 (n + u) / 17, u ~ U[0, 1): the continuous data every model is trained on."""
    u = torch.rand(n.shape, generator=gen)
    return -1.0 + 2.0 * (n.float() + u) / LEVELS


# ------------------------------------------------------------------------------------------------ training
def rank_batch(args) -> int:
    """Per-process batch: the global batch --batch-size split over the torchrun processes."""
    return max(1, args.batch_size // sdegen.distributed.current_context().world_size)


def cached(path: str, build_and_train):
    if os.path.exists(path):
        model, _ = sdegen.load_checkpoint(path)
        print(f"loaded {os.path.basename(path)} from the cache")
        return model
    model, ema, extra = build_and_train()
    sdegen.save_checkpoint(path, model, ema=ema, extra=extra, is_main=sdegen.distributed.is_main_process())
    sdegen.distributed.current_context().barrier()  # the other ranks load what rank 0 wrote
    model, _ = sdegen.load_checkpoint(path)
    return model


def train_score_model(train, args, progress):
    sde = sdegen.VPSDE()
    model = sdegen.ScoreModel(sdegen.UNet(1, args.width), sde, prediction="eps")
    levels = train[0]

    def loss_fn(m, idx, gen):
        return sdegen.dsm_loss(m, dequantized(levels[idx], gen), seed=gen)

    res = sdegen.train_ddp(model, loss_fn, torch.arange(levels.shape[0]), args.train_steps,
                           batch_size=rank_batch(args), lr=1e-3, warmup_steps=100, ema_decay=0.999, seed=args.seed,
                           progress=progress, desc="score model")
    return model, res.ema, {"final_loss": sum(res.losses[-100:]) / max(1, len(res.losses[-100:]))}


def train_classifier(train, sde, steps, args, progress, noisy: bool):
    clf = sdegen.ConvClassifier(1, 10, base=32, time_conditional=noisy)
    levels, labels = train

    def loss_fn(c, idx, gen):
        x = dequantized(levels[idx], gen)
        if noisy:
            return sdegen.classifier_loss(c, sde, x, labels[idx], seed=gen)
        return torch.nn.functional.cross_entropy(c(x), labels[idx])

    res = sdegen.train_ddp(clf, loss_fn, torch.arange(levels.shape[0]), steps, batch_size=rank_batch(args),
                           lr=1e-3, warmup_steps=50, ema_decay=0.995, seed=args.seed + (1 if noisy else 2),
                           progress=progress, desc="noisy classifier" if noisy else "clean classifier")
    return clf, res.ema, {}


# ------------------------------------------------------------------------------------------------ metrics
def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}) between feature sets (n, k)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    S_a, S_b = torch.cov(a.T), torch.cov(b.T)
    ev, U = torch.linalg.eigh(S_a)
    root_a = (U * ev.clamp_min(0).sqrt()) @ U.T
    cross = torch.linalg.eigvalsh(root_a @ S_b @ root_a).clamp_min(0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(S_a) + torch.trace(S_b) - 2.0 * cross)


@torch.no_grad()
def predict(clf, x, batch=512):
    return torch.cat([clf(x[i:i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def features(clf, x):
    return clf.features(x)


def save_grid(x: torch.Tensor, rows: int, path: str, title: str, row_labels=None):
    if not sdegen.distributed.is_main_process():
        return
    cols = x.shape[0] // rows
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6 + 0.4), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(x[i * cols + j, 0].clamp(-1, 1).cpu().numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0 and row_labels is not None:
                ax.set_ylabel(str(row_labels[i]), rotation=0, labelpad=10)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ generation
def generate(model, noisy_clf, digits, args, scale, progress):
    y = torch.tensor(digits, dtype=torch.int64).repeat_interleave(args.per_digit)
    score_for = lambda idx: sdegen.classifier_guidance(model, noisy_clf, y[idx], scale) if scale > 0 else model
    world = sdegen.distributed.current_context().world_size
    with torch.no_grad():  # one chunk per process; every rank receives all samples
        res = sdegen.sample_sharded(model.sde, None, shape=(y.shape[0], 1, 8, 8), score_for=score_for, seed=args.seed,
                                    batch_size=-(-y.shape[0] // world), gather="all", method=args.sampler,
                                    steps=args.steps, denoise=True, progress=progress)
    return res["samples"], y, res


def inpainting_figure(model, test, args, progress):
    levels, labels = test
    pick = torch.stack([torch.nonzero(labels == d)[0, 0] for d in range(10)])
    x0 = on_grid(levels[pick])
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :4] = True  # the top half is known
    fills = []
    for k in range(3):
        with torch.no_grad():
            fills.append(sdegen.inpaint(model.sde, model, x0, mask, sampler=args.sampler, steps=args.steps,
                                        seed=args.seed + 100 + k))
    shown = torch.where(mask, x0, torch.full_like(x0, -1.0))
    grid = torch.stack([x0, shown] + fills, dim=1).reshape(-1, 1, 8, 8)
    path = os.path.join(args.out, "inpainting.png")
    save_grid(grid.reshape(10, 5, 1, 8, 8).transpose(0, 1).reshape(-1, 1, 8, 8), 5, path,
              "inpainting: original / top half known / three fills", ["orig", "known", "fill 1", "fill 2", "fill 3"])
    return path


def bits_per_dim(model, test, args):
    if not hasattr(sdegen, "log_likelihood") or args.bpd_count <= 0:
        print("bits/dim: skipped (sdegen.log_likelihood is not available in this installation)")
        return None
    x = on_grid(test[0][: args.bpd_count])
    world = sdegen.distributed.current_context().world_size
    res = sdegen.log_likelihood_sharded(model.sde, model, x, seed=args.seed, batch_size=-(-x.shape[0] // world),
                                        gather="all", levels=LEVELS, data_range=(-1.0, 1.0), rtol=1e-4, atol=1e-4)
    bpd = res["bpd"].double()
    print(f"held-out bits/dim (uniform dequantization, {x.shape[0]} test images, PF-ODE dopri5 rtol=atol=1e-4, "
          f"Hutchinson, NFE {res.nfe}): {bpd.mean():.3f} +- {bpd.std() / bpd.numel() ** 0.5:.3f}")
    return float(bpd.mean())


def main(argv=None):
    args = parse_args(argv)
    ctx = sdegen.init_distributed()  # torchrun: join the process group; plain python: one process
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints
    torch.set_num_threads(args.threads)
    digits = [int(d) for d in args.digits.split(",")]
    if any(not 0 <= d <= 9 for d in digits):
        raise SystemExit(f"--digits must be digits 0..9; got {args.digits!r}")
    os.makedirs(args.out, exist_ok=True)
    cache = args.cache_dir or os.path.join(args.out, "cache")
    progress = not args.no_progress and ctx.is_main
    train, test = load_data()
    clf_steps = args.classifier_steps or max(1, args.train_steps // 2)
    key = hashlib.sha1(json.dumps([args.train_steps, clf_steps, args.width, args.batch_size, args.seed]).encode())
    tag = key.hexdigest()[:8]
    t0 = time.time()
    model = cached(os.path.join(cache, f"score_{tag}.pt"), lambda: train_score_model(train, args, progress))
    noisy = cached(os.path.join(cache, f"noisy_clf_{tag}.pt"),
                   lambda: train_classifier(train, model.sde, clf_steps, args, progress, noisy=True))
    clean = cached(os.path.join(cache, f"clean_clf_{tag}.pt"),
                   lambda: train_classifier(train, model.sde, clf_steps, args, progress, noisy=False))
    print(f"models ready in {time.time() - t0:.0f} s")
    report(model, noisy, clean, train, test, digits, args, progress)
    ctx.close()


def report(model, noisy, clean, train, test, digits, args, progress):
    gen = torch.Generator().manual_seed(args.seed)
    x_test = dequantized(test[0], gen)
    acc = float((predict(clean, x_test) == test[1]).double().mean())
    print(f"clean classifier (trained on real training digits only): test accuracy {acc:.3f} on {len(test[1])} images")
    x, y, info = generate(model, noisy, digits, args, args.scale, progress)
    x_u, _, info_u = generate(model, noisy, digits, args, 0.0, progress)
    hit, hit_u = (predict(clean, x) == y).double(), (predict(clean, x_u) == y).double()
    se = (hit.var() / hit.numel()).sqrt()
    print(f"guided (scale {args.scale:g}, {args.sampler}, {args.steps} steps, NFE {info.nfe} score + {info.nfe - 1} "
          f"classifier gradients): {float(hit.mean()):.3f} +- {float(se):.3f} assigned to the requested digit")
    print(f"unguided (same sampler, NFE {info_u.nfe}): {float(hit_u.mean()):.3f} assigned to the 'requested' digit")
    per = {d: float(hit[y == d].mean()) for d in digits}
    print("per digit:", ", ".join(f"{d}: {v:.2f}" for d, v in per.items()))
    real_all = torch.cat([train[0], test[0]]), torch.cat([train[1], test[1]])
    f_gen, f_half = [], []
    for d in digits:
        real = dequantized(real_all[0][real_all[1] == d], gen)
        half = real.shape[0] // 2
        f_gen.append(frechet_distance(features(clean, x[y == d]), features(clean, x_test[test[1] == d])))
        f_half.append(frechet_distance(features(clean, real[:half]), features(clean, real[half:])))
    print(f"Frechet distance in the clean classifier's {clean.feature_dim}-d feature space, mean over digits: "
          f"guided vs real test digits of that class {sum(f_gen) / len(f_gen):.2f} "
          f"(n = {args.per_digit} vs ~{len(test[1]) // 10}); two halves of the real digits of that class "
          f"{sum(f_half) / len(f_half):.2f} (n ~ 90 vs 90)")
    cols = min(args.per_digit, 10)
    shown = torch.cat([x[y == d][:cols] for d in digits])
    save_grid(shown, len(digits), os.path.join(args.out, "guided_samples.png"),
              f"classifier guidance, scale {args.scale:g}, {args.sampler}, {args.steps} steps", digits)
    shown_u = torch.cat([x_u[y == d][:cols] for d in digits])
    save_grid(shown_u, len(digits), os.path.join(args.out, "unguided_samples.png"), "unguided samples")
    print("inpainting figure:", inpainting_figure(model, test, args, progress))
    bits_per_dim(model, test, args)
    print("grids:", os.path.join(args.out, "guided_samples.png"), os.path.join(args.out, "unguided_samples.png"))


if __name__ == "__main__":
    main()
