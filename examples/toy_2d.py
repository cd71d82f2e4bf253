"""Train a score model on a 2-D dataset (scikit-learn's two moons) and plot the data, samples and the learned score.

    python examples/toy_2d.py --steps 3000 --out examples/output
"""

from __future__ import annotations

import argparse
import os

import matplotlib
import torch

import sdegen

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--sampler", default="reverse_diffusion")
    p.add_argument("--sample-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"))
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's own)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from sklearn.datasets import make_moons

    data = torch.as_tensor(make_moons(8000, noise=0.05, random_state=args.seed)[0], dtype=torch.float32)
    data = ((data - data.mean(0)) / data.std(0)).to(args.device)
    sde = sdegen.VPSDE()
    with torch.random.fork_rng(devices=[]):  # the initial weights from --seed, torch's global generator untouched
        torch.manual_seed(args.seed)
        net = sdegen.MLP(2, hidden=128, depth=3)
    model = sdegen.ScoreModel(net, sde, prediction="eps").to(args.device)
    res = sdegen.train(model, lambda m, b, g: sdegen.dsm_loss(m, b, seed=g), data, args.steps, batch_size=256,
                       lr=2e-3, warmup_steps=100, seed=args.seed, desc="toy score model")
    score = res.ema.module
    with torch.no_grad():
        x = sdegen.sample(sde, score, shape=(args.samples, 2), method=args.sampler, steps=args.sample_steps,
                          seed=args.seed, denoise=True, device=args.device)
    plot(data.cpu(), x.cpu(), score.cpu(), sde, os.path.join(args.out, "toy_2d.png"))


def plot(data, x, score, sde, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig, ax = plt.subplots(1, 3, figsize=(12, 4))
    ax[0].scatter(*data[:2000].T.numpy(), s=2)
    ax[0].set_title("data (two moons)")
    ax[1].scatter(*x.T.numpy(), s=2, color="C1")
    ax[1].set_title("samples")
    g = torch.linspace(-2.5, 2.5, 25)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    t = 0.05
    with torch.no_grad():
        s = score(grid, torch.full((grid.shape[0],), t))
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-8) * s.norm(dim=1, keepdim=True).clamp_max(10.0) / 10.0
    ax[2].scatter(*data[:2000].T.numpy(), s=1, color="0.8")
    ax[2].quiver(*grid.T.numpy(), *s.T.numpy(), angles="xy")
    ax[2].set_title(f"learned score at t = {t}")
    for a in ax:
        a.set_xlim(-2.5, 2.5), a.set_ylim(-2.5, 2.5), a.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print("figure:", path)


if __name__ == "__main__":
    main()
