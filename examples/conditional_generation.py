"""Class-conditional generation of handwritten digits with classifier guidance (Song et al. 2021, section 5).

On scikit-learn's bundled 8x8 digits (1,797 images, 17 grey levels, no download) this script
  1. loads a score model (a small U-Net, VP SDE, denoising score matching), a noise-conditional classifier
     p_t(y | x_t) and an independent clean classifier (used only for evaluation) from examples/checkpoints/,
     after checking their SHA-256 checksums against examples/checkpoints/SHA256SUMS; with --train it trains
     the three from scratch on the training split instead (a few minutes on a CPU) and writes them there;
  2. samples every requested digit with classifier guidance at several guidance scales and reports the fraction
     of samples the clean classifier assigns to the requested digit at each scale (scale 0: unguided);
  3. writes figures to --out: a grid of guided samples per digit, unguided samples, an inpainting figure (top
     half known, bottom half filled in) and the accuracy against the guidance scale; optionally held-out
     bits/dim (--bpd-count) and a Frechet distance in the clean classifier's feature space.

Under torchrun the training runs with DistributedDataParallel and the sampling and bits/dim are split over the
processes; rank 0 prints and writes.

    python examples/conditional_generation.py                      # shipped checkpoints: load, sample, plot
    python examples/conditional_generation.py --train              # retrain the checkpoints from scratch
    torchrun --standalone --nproc_per_node=2 examples/conditional_generation.py --train
"""

from __future__ import annotations

import time

T_START = time.time()  # the reported wall time includes the imports, as a user waits for them

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import matplotlib  # noqa: E402
import torch  # noqa: E402

import sdegen  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LEVELS = 17  # the digits hold grey levels 0..16
HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINTS = os.path.join(HERE, "checkpoints")
NAMES = {"score": "score_model.pt", "noisy": "noisy_classifier.pt", "clean": "clean_classifier.pt"}
MANIFEST = "SHA256SUMS"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits to generate")
    p.add_argument("--per-digit", type=int, default=20, help="samples per requested digit and guidance scale")
    p.add_argument("--scale", type=float, default=2.0, help="classifier-guidance scale of the headline figures")
    p.add_argument("--scales", default="0,0.5,1,2,4", help="comma-separated scales of the accuracy plot")
    p.add_argument("--sampler", default="dpmpp_2m_sde", help="any fixed-step sampler name of sdegen.sample")
    p.add_argument("--steps", type=int, default=50, help="sampler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "output"), help="folder for the figures")
    p.add_argument("--checkpoints", default=CHECKPOINTS, help="folder of the checkpoints and their SHA256SUMS")
    p.add_argument("--train", action="store_true", help="train the three networks from scratch into --checkpoints")
    p.add_argument("--train-steps", type=int, default=2000, help="score-model training steps (--train)")
    p.add_argument("--classifier-steps", type=int, default=None, help="steps of each classifier (--train)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (--train)")
    p.add_argument("--width", type=int, default=32, help="U-Net base channels (--train)")
    p.add_argument("--bpd-count", type=int, default=0, help="test images for held-out bits/dim (0: skip; slow)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train and sample (default: CUDA when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: torch's own choice, lowered when the load average shows "
                        "other processes using the cores)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_device(device: str) -> None:
    """SystemExit naming --device when it is not a device this torch build can use (before any checkpoint loads)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SystemExit(f"--device must be a torch device such as 'cpu' or 'cuda'; got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: this torch build ({torch.__version__}) sees no CUDA device; use --device "
                         "cpu or install a CUDA build of torch")


def cpu_threads(requested, processes: int = 1) -> int:
    """Intra-op threads: ``requested`` when given, else torch's default (one per core) capped by the cores that the
    1-minute load average leaves free, shared between this machine's ``processes``. Threads beyond the free cores
    make every operation wait for the slowest, descheduled thread: on a 2-core machine at load 4-7 the default 2
    threads ran this example 4x slower than 1 thread."""
    if requested is not None:
        if requested < 1:
            raise SystemExit(f"--threads must be >= 1; got {requested}")
        return requested
    default = torch.get_num_threads()
    try:
        free = (os.cpu_count() or default) - os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform: keep torch's choice
        return default
    return max(1, min(default, int(free) // max(1, processes)))


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
    """Uniform dequantization -1 + 2 (n + u) / 17, u ~ U[0, 1): the continuous data every model is trained on.
    u is drawn on the generator's device (that of the levels)."""
    u = torch.rand(n.shape, generator=gen, device=gen.device)
    return -1.0 + 2.0 * (n.float() + u) / LEVELS


# ------------------------------------------------------------------------------------------------ checkpoints
def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str, names) -> str:
    """Write ``folder/SHA256SUMS`` in the format of ``sha256sum`` (check it by hand with ``sha256sum -c``)."""
    path = os.path.join(folder, MANIFEST)
    with open(path, "w") as f:
        f.writelines(f"{sha256(os.path.join(folder, n))}  {n}\n" for n in sorted(names))
    return path


def verify_checkpoints(folder: str, names) -> None:
    """Check every checkpoint in ``names`` against ``folder/SHA256SUMS`` before anything is loaded from it.
    Raises FileNotFoundError when a file is missing and ValueError when a checksum does not match."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest):
        raise FileNotFoundError(f"no {MANIFEST} in {folder}: there are no checkpoints to load; run with --train "
                                f"to train them (or restore the shipped examples/checkpoints/).")
    expected = {}
    with open(manifest) as f:
        for line in f:
            if line.strip():
                digest, name = line.split(maxsplit=1)
                expected[name.strip().lstrip("*")] = digest.lower()
    for name in names:
        path = os.path.join(folder, name)
        if name not in expected:
            raise ValueError(f"{manifest} lists no checksum for {name}; it lists {sorted(expected)}.")
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} is missing; run with --train to retrain it.")
        got = sha256(path)
        if got != expected[name]:
            raise ValueError(f"checksum mismatch for {path}: SHA-256 {got}, expected {expected[name]} from "
                             f"{manifest}. The file is damaged or was changed: restore it (git checkout -- "
                             f"{os.path.relpath(path)}) or retrain with --train.")


def load_models(folder: str, device):
    verify_checkpoints(folder, NAMES.values())
    return {k: sdegen.load_checkpoint(os.path.join(folder, n), map_location=device)[0] for k, n in NAMES.items()}


def save_trained(path: str, model, ema, extra) -> None:
    """Save the EMA weights (what every model here samples and classifies with) with the model's config."""
    sdegen.save_checkpoint(path, ema.module if ema is not None else model, extra=extra,
                           is_main=sdegen.distributed.is_main_process())


# ------------------------------------------------------------------------------------------------ training
def rank_batch(args) -> int:
    """Per-process batch: the global batch --batch-size split over the torchrun processes."""
    return max(1, args.batch_size // sdegen.distributed.current_context().world_size)


def seeded(build, seed: int, *args, **kwargs):
    """``build(*args, **kwargs)`` with its initial weights drawn from torch's generator seeded with ``seed`` (the
    caller's global random state is restored afterwards), so --train starts from the same weights every time."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args, **kwargs)


def train_score_model(train, args, progress):
    sde = sdegen.VPSDE()
    model = sdegen.ScoreModel(seeded(sdegen.UNet, args.seed, 1, args.width), sde, prediction="eps").to(args.device)
    levels = train[0].to(args.device)

    def loss_fn(m, idx, gen):
        return sdegen.dsm_loss(m, dequantized(levels[idx], gen), seed=gen)

    res = sdegen.train_ddp(model, loss_fn, torch.arange(levels.shape[0], device=args.device), args.train_steps,
                           batch_size=rank_batch(args), lr=1e-3, warmup_steps=100, ema_decay=0.999, seed=args.seed,
                           progress=progress, desc="score model")
    return model, res.ema, {"final_loss": sum(res.losses[-100:]) / max(1, len(res.losses[-100:]))}


def train_classifier(train, sde, steps, args, progress, noisy: bool):
    seed = args.seed + (1 if noisy else 2)
    clf = seeded(sdegen.ConvClassifier, seed, 1, 10, base=32, time_conditional=noisy).to(args.device)
    levels, labels = train[0].to(args.device), train[1].to(args.device)

    def loss_fn(c, idx, gen):
        x = dequantized(levels[idx], gen)
        if noisy:
            return sdegen.classifier_loss(c, sde, x, labels[idx], seed=gen)
        return torch.nn.functional.cross_entropy(c(x), labels[idx])

    res = sdegen.train_ddp(clf, loss_fn, torch.arange(levels.shape[0], device=args.device), steps,
                           batch_size=rank_batch(args), lr=1e-3, warmup_steps=50, ema_decay=0.995,
                           seed=seed, progress=progress,
                           desc="noisy classifier" if noisy else "clean classifier")
    return clf, res.ema, {}


def train_models(train, args, progress):
    """Train the score model and both classifiers, write them and their SHA256SUMS to --checkpoints."""
    os.makedirs(args.checkpoints, exist_ok=True)
    clf_steps = args.classifier_steps or max(1, args.train_steps // 2)
    config = {"train_steps": args.train_steps, "classifier_steps": clf_steps, "width": args.width,
              "batch_size": args.batch_size, "seed": args.seed}
    sde = sdegen.VPSDE()
    jobs = {"score": lambda: train_score_model(train, args, progress),
            "noisy": lambda: train_classifier(train, sde, clf_steps, args, progress, noisy=True),
            "clean": lambda: train_classifier(train, sde, clf_steps, args, progress, noisy=False)}
    for key, job in jobs.items():
        t0 = time.time()
        model, ema, extra = job()
        seconds = time.time() - t0
        print(f"trained {NAMES[key]} in {seconds:.0f} s")
        save_trained(os.path.join(args.checkpoints, NAMES[key]), model, ema,
                     {**extra, **config, "train_seconds": round(seconds, 1)})
    ctx = sdegen.distributed.current_context()
    if ctx.is_main:
        print("checksums:", write_manifest(args.checkpoints, NAMES.values()))
    ctx.barrier()  # the other ranks load what rank 0 wrote


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
                ax.set_ylabel(str(row_labels[i]), rotation=0, labelpad=14, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ generation
def generate(model, noisy_clf, digits, args, scale, progress):
    """``args.per_digit`` samples of every digit in ``digits``, guided at ``scale`` (0: unguided)."""
    y = torch.tensor(digits, dtype=torch.int64, device=args.device).repeat_interleave(args.per_digit)
    score_for = lambda idx: sdegen.classifier_guidance(model, noisy_clf, y[idx], scale) if scale > 0 else model
    world = sdegen.distributed.current_context().world_size
    with torch.no_grad():  # one chunk per process; every rank receives all samples
        res = sdegen.sample_sharded(model.sde, None, shape=(y.shape[0], 1, 8, 8), score_for=score_for, seed=args.seed,
                                    batch_size=-(-y.shape[0] // world), gather="all", method=args.sampler,
                                    steps=args.steps, denoise=True, progress=progress, device=args.device)
    return res["samples"].to(args.device), y, res


def inpainting_figure(model, test, args):
    levels, labels = test
    pick = torch.stack([torch.nonzero(labels == d)[0, 0] for d in range(10)])
    x0 = on_grid(levels[pick]).to(args.device)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool, device=args.device)
    mask[:, :4] = True  # the top half is known
    fills = []
    for k in range(3):
        with torch.no_grad():
            fills.append(sdegen.inpaint(model.sde, model, x0, mask, method="reverse_diffusion", steps=args.steps,
                                        seed=args.seed + 100 + k))
    shown = torch.where(mask, x0, torch.full_like(x0, -1.0))
    grid = torch.stack([x0, shown] + fills, dim=1).reshape(-1, 1, 8, 8)
    path = os.path.join(args.out, "inpainting.png")
    save_grid(grid.reshape(10, 5, 1, 8, 8).transpose(0, 1).reshape(-1, 1, 8, 8), 5, path,
              "inpainting: original / top half known / three fills", ["orig", "known", "fill 1", "fill 2", "fill 3"])
    return path


def accuracy_plot(sweep, args, path):
    """Fraction assigned to the requested digit against the guidance scale, with binomial standard errors."""
    if not sdegen.distributed.is_main_process():
        return
    scales = sorted(sweep)
    acc = [sweep[s][0] for s in scales]
    se = [sweep[s][1] for s in scales]
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    ax.errorbar(scales, acc, yerr=se, marker="o", capsize=3)
    ax.axhline(0.1, color="grey", lw=0.8, ls=":", label="chance (0.1)")
    ax.set_xlabel("classifier-guidance scale")
    ax.set_ylabel("assigned to the requested digit")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{args.sampler}, {args.steps} steps, {args.per_digit} per digit", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bits_per_dim(model, test, args):
    if args.bpd_count <= 0:
        return None
    x = on_grid(test[0][: args.bpd_count]).to(args.device)
    world = sdegen.distributed.current_context().world_size
    res = sdegen.log_likelihood_sharded(model.sde, model, x, seed=args.seed, batch_size=-(-x.shape[0] // world),
                                        gather="all", levels=LEVELS, data_range=(-1.0, 1.0), rtol=1e-4, atol=1e-4)
    bpd = res["bpd"].double()
    print(f"held-out bits/dim (uniform dequantization, {x.shape[0]} test images, PF-ODE dopri5 rtol=atol=1e-4, "
          f"Hutchinson, NFE {res.nfe}): {bpd.mean():.3f} +- {bpd.std() / bpd.numel() ** 0.5:.3f}")
    return float(bpd.mean())


def main(argv=None):
    t_start = T_START if argv is None else time.time()
    args = parse_args(argv)
    ctx = sdegen.init_distributed()  # torchrun: join the process group; plain python: one process
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # rank 0 prints
    threads = cpu_threads(args.threads, ctx.world_size)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if ctx.world_size > 1 and args.device == "cuda":
        args.device = str(ctx.device)  # one GPU per process
    check_device(args.device)
    try:
        digits = [int(d) for d in args.digits.split(",")]
        scales = sorted({float(v) for v in args.scales.split(",")} | {0.0, args.scale})
    except ValueError:
        raise SystemExit(f"--digits must be comma-separated digits and --scales comma-separated numbers; got "
                         f"{args.digits!r} and {args.scales!r}") from None
    if any(not 0 <= d <= 9 for d in digits):
        raise SystemExit(f"--digits must be digits 0..9; got {args.digits!r}")
    for name in ("per_digit", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if any(v < 0 for v in scales):
        raise SystemExit(f"--scale and --scales must be >= 0; got {args.scale!r} and {args.scales!r}")
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress and ctx.is_main
    train, test = load_data()
    if args.train:
        train_models(train, args, progress)
    t0 = time.time()
    try:
        models = load_models(args.checkpoints, args.device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(f"loaded {', '.join(NAMES.values())} from {args.checkpoints} (SHA-256 checked) in {time.time() - t0:.1f} s"
          f" on {args.device}, {torch.get_num_threads()} CPU threads")
    summary = report(models, train, test, digits, scales, args, progress)
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    if ctx.is_main:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    print(f"total wall time {summary['wall_seconds']:.0f} s")
    ctx.close()


def report(models, train, test, digits, scales, args, progress):
    model, noisy, clean = models["score"], models["noisy"], models["clean"]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    test_levels, test_labels = test[0].to(args.device), test[1].to(args.device)
    x_test = dequantized(test_levels, gen)
    clean_acc = float((predict(clean, x_test) == test_labels).double().mean())
    print(f"clean classifier (trained on real training digits only): test accuracy {clean_acc:.3f} on "
          f"{len(test_labels)} images")
    sweep, samples = {}, {}
    for scale in scales:
        x, y, info = generate(model, noisy, digits, args, scale, progress)
        hit = (predict(clean, x) == y).double()
        sweep[scale] = (float(hit.mean()), float((hit.var() / hit.numel()).sqrt()))
        samples[scale] = (x, y, info, hit)
        grads = " + one classifier gradient each" if scale > 0 else ""
        print(f"scale {scale:g}: {sweep[scale][0]:.3f} +- {sweep[scale][1]:.3f} assigned to the requested digit "
              f"({y.numel()} samples, {args.sampler}, {args.steps} steps, NFE {info.nfe}{grads})")
    x, y, info, hit = samples[args.scale]
    print(f"guided (scale {args.scale:g}) per digit:",
          ", ".join(f"{d}: {float(hit[y == d].mean()):.2f}" for d in digits))
    if args.per_digit >= 2:  # a covariance needs two samples
        f_gen = [frechet_distance(features(clean, x[y == d]), features(clean, x_test[test_labels == d]))
                 for d in digits]
        print(f"Frechet distance in the clean classifier's {clean.feature_dim}-d feature space, guided vs real test "
              f"digits of that class, mean over digits: {sum(f_gen) / len(f_gen):.2f} (n = {args.per_digit} vs "
              f"~{len(test_labels) // 10}; small samples bias it upwards)")
    else:
        f_gen = [math.nan]
        print("Frechet distance: n/a (it needs --per-digit >= 2)")
    cols = min(args.per_digit, 10)
    figures = {"guided": os.path.join(args.out, "guided_samples.png"),
               "unguided": os.path.join(args.out, "unguided_samples.png"),
               "accuracy": os.path.join(args.out, "accuracy_vs_scale.png")}
    save_grid(torch.cat([x[y == d][:cols] for d in digits]), len(digits), figures["guided"],
              f"classifier guidance, scale {args.scale:g}, {args.sampler}, {args.steps} steps", digits)
    x_u, y_u = samples[0.0][:2]
    save_grid(torch.cat([x_u[y_u == d][:cols] for d in digits]), len(digits), figures["unguided"], "unguided samples")
    accuracy_plot(sweep, args, figures["accuracy"])
    figures["inpainting"] = inpainting_figure(model, test, args)
    bpd = bits_per_dim(model, test, args)
    print("figures:", ", ".join(figures.values()))
    return {"clean_test_accuracy": clean_acc, "guided_scale": args.scale,
            "accuracy_by_scale": {f"{k:g}": v for k, v in sweep.items()}, "frechet_guided": sum(f_gen) / len(f_gen) if args.per_digit >= 2 else None,
            "bits_per_dim": bpd, "sampler": args.sampler, "steps": args.steps, "per_digit": args.per_digit,
            "device": args.device, "threads": torch.get_num_threads(),
            "figures": {k: os.path.basename(v) for k, v in figures.items()}}


if __name__ == "__main__":
    main()
