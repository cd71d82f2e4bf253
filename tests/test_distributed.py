"""Tests for sdegen.distributed: two gloo processes on 127.0.0.1 against single-process runs.

One spawn of two CPU processes (paying the start-up once) computes sharded samples, sharded log-likelihoods
and two DDP training steps; the parent compares them with single-process references: samples and fixed-grid
log-likelihoods equal ``sdegen.sample`` / ``sdegen.log_likelihood`` on the whole batch, adaptive likelihoods
equal a one-process sharded run chunk for chunk (and the oracle's exact log-density within the solver
tolerance), and the DDP weights equal one process trained on the concatenated batch.
"""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import sdegen
from sdegen import distributed as sd
from sdegen.likelihood import default_t_min

WORLD = 2
SEED = 11
N_SAMPLES, N_DATA, BATCH = 7, 5, 2  # uneven: 4 chunks of samples (ranks get 4 and 3), 3 chunks of data (3 and 2)
SAMPLE_KW = dict(method="euler_maruyama", steps=10, dtype=torch.float64)
LIK_FIXED = dict(method="rk4", steps=4, divergence="hutchinson", probes=2)
TRAIN_STEPS, TRAIN_ROWS = 2, 8


def _problem():
    return sdegen.GaussianMixture.random(dim=2, n_components=3, seed=0), sdegen.VPSDE()


def _lik_adaptive(gm, sde):
    # the exact marginal at T as the prior: what remains of the error is the dopri5 solve's
    t_end = torch.tensor(sde.T, dtype=torch.float64)
    return dict(divergence="exact", rtol=1e-6, atol=1e-6, prior=lambda z: gm.log_prob(z, t_end, sde))


def _data(gm):
    return gm.sample(N_DATA, seed=3, dtype=torch.float64)


def _model(init_seed: int):
    with torch.random.fork_rng():  # leaves the global generator as it was
        torch.manual_seed(init_seed)
        return sdegen.ScoreModel(sdegen.MLP(2, hidden=16, depth=1), sdegen.VPSDE(), prediction="eps").double()


def _train_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(TRAIN_ROWS, 2, generator=g, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(TRAIN_ROWS, generator=g, dtype=torch.float64)
    z = torch.randn(TRAIN_ROWS, 2, generator=g, dtype=torch.float64)
    return x, t, z


def _loss(model, batch, gen):
    # denoising score matching with t and noise carried by the data, so the loss is a function of the batch alone
    x0, t, z = batch
    mean, std = model.sde.marginal_prob(x0, t)
    s = model(mean + std[:, None] * z, t)
    return ((std[:, None] * s + z) ** 2).sum(1).mean()


def _train_options(model):
    return dict(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), ema_decay=0.9, grad_clip=1.0,
                progress=False)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    with sd.init_distributed("gloo", timeout=60) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, WORLD, "gloo")
        gm, sde = _problem()
        x = _data(gm)
        smp = sd.sample_sharded(sde, gm, N_SAMPLES, (2,), seed=SEED, batch_size=BATCH,
                                shard_dir=os.path.join(out, "shards"), **SAMPLE_KW)
        single = sd.sample_sharded(sde, gm, 1, (2,), seed=SEED, batch_size=BATCH, **SAMPLE_KW)  # rank 1 idle
        fixed = sd.log_likelihood_sharded(sde, gm, x, seed=SEED, batch_size=BATCH, gather="all", **LIK_FIXED)
        adaptive = sd.log_likelihood_sharded(sde, gm, x, seed=SEED, batch_size=BATCH, **_lik_adaptive(gm, sde))
        model = _model(init_seed=rank)  # different initial weights: DDP must broadcast rank 0's
        res = sd.train_ddp(model, _loss, _train_data(), TRAIN_STEPS, batch_size=TRAIN_ROWS // (2 * WORLD),
                           seed=SEED, checkpoint=os.path.join(out, "ckpt.pt"), **_train_options(model))
        # a held-out metric that differs between ranks (each scores its own share): one averaged decision
        calls = []
        metric = lambda m: (calls.append(1) or len(calls)) * (1.0 if rank == 0 else -1.0)  # noqa: E731
        watched = _model(init_seed=0)
        early = sd.train_ddp(watched, _loss, _train_data(), 6, batch_size=TRAIN_ROWS // (2 * WORLD), seed=SEED,
                             evaluate=metric, eval_every=1, patience=2, restore_best=True,
                             **_train_options(watched))
        torch.save({"samples": smp["samples"], "sample_nfe": smp.nfe, "local_samples": smp.local["samples"],
                    "early": (early.steps, early.best_step, early.evaluations, watched.state_dict()),
                    "single": single["samples"],
                    "indices": smp.indices, "fixed": fixed["log_prob"], "fixed_nfe": fixed.nfe,
                    "adaptive": adaptive["log_prob"], "adaptive_bpd": adaptive["bpd"],
                    "weights": model.state_dict(), "ema": res.ema.module.state_dict(), "losses": res.losses},
                   os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    procs = mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("the two gloo workers did not finish within 240 s")
    return out, [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def test_gathered_samples_equal_one_process(run):
    out, ranks = run
    gm, sde = _problem()
    ref, info = sdegen.sample(sde, gm, shape=(N_SAMPLES, 2), seed=SEED, return_info=True, **SAMPLE_KW)
    assert ranks[1]["samples"] is None  # gathered on rank 0 only
    assert torch.equal(ranks[0]["samples"], ref)
    # uneven shards: chunks [0,2), [4,6) on rank 0 and [2,4), [6,7) on rank 1, each rank holding its own rows
    assert ranks[0]["indices"].tolist() == [0, 1, 4, 5] and ranks[1]["indices"].tolist() == [2, 3, 6]
    for r in range(WORLD):
        assert torch.equal(ranks[r]["local_samples"], ref[ranks[r]["indices"]])
    # NFE summed over 4 chunks on 2 ranks: 4 batched runs of 10 steps
    assert ranks[0]["sample_nfe"] == ranks[1]["sample_nfe"] == 4 * info.nfe
    assert torch.equal(sd.load_shards(os.path.join(out, "shards"))["samples"], ref)
    # one example: a single chunk, rank 1 has nothing to do but still takes part in the gather
    assert torch.equal(ranks[0]["single"], sdegen.sample(sde, gm, shape=(1, 2), seed=SEED, **SAMPLE_KW))


def test_gathered_log_likelihoods_equal_one_process(run):
    _, ranks = run
    gm, sde = _problem()
    x = _data(gm)
    ref = sdegen.log_likelihood(sde, gm, x, seed=SEED, **LIK_FIXED)
    for r in range(WORLD):  # gather="all": every rank holds the whole result
        torch.testing.assert_close(ranks[r]["fixed"], ref.log_prob, rtol=0, atol=1e-10)
    assert ranks[1]["adaptive"] is None
    assert ranks[0]["fixed_nfe"] == 3 * ref.nfe  # 3 chunks of the same fixed grid
    # adaptive steps are shared within a batch: the reference is the same chunks solved in one process
    one = sd.log_likelihood_sharded(sde, gm, x, seed=SEED, batch_size=BATCH, **_lik_adaptive(gm, sde))
    torch.testing.assert_close(ranks[0]["adaptive"], one["log_prob"], rtol=0, atol=1e-10)
    torch.testing.assert_close(ranks[0]["adaptive_bpd"], one["bpd"], rtol=0, atol=1e-10)
    exact = gm.log_prob(x, torch.tensor(default_t_min(sde), dtype=torch.float64), sde)  # log_likelihood's t_min
    torch.testing.assert_close(ranks[0]["adaptive"], exact, rtol=0, atol=1e-4)


def _train_reference():
    model = _model(init_seed=0)
    res = sdegen.train(model, _loss, _train_data(), TRAIN_STEPS, batch_size=TRAIN_ROWS // 2, seed=SEED,
                       **_train_options(model))
    return model, res


def test_ddp_steps_equal_one_process_on_the_concatenated_batch(run):
    out, ranks = run
    model, res = _train_reference()
    for r in range(WORLD):
        for name, w in model.state_dict().items():
            torch.testing.assert_close(ranks[r]["weights"][name], w, rtol=0, atol=1e-12)
        for name, w in res.ema.module.state_dict().items():
            torch.testing.assert_close(ranks[r]["ema"][name], w, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.tensor(ranks[r]["losses"]), torch.tensor(res.losses), rtol=0, atol=1e-12)
    # the comparison can fail: a step on rank 0's half of the batch alone lands elsewhere
    half = _model(init_seed=0)
    sdegen.train(half, _loss, _train_data(), TRAIN_STEPS, batch_size=TRAIN_ROWS // 4, seed=SEED,
                 **_train_options(half))
    gap = max(float((a - b).abs().max()) for a, b in zip(half.state_dict().values(), model.state_dict().values()))
    assert gap > 1e-4
    loaded, state = sdegen.load_checkpoint(os.path.join(out, "ckpt.pt"), use_ema=False)
    assert state["extra"]["world_size"] == WORLD
    for name, w in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], w, rtol=0, atol=1e-12)  # in its saved dtype, float64
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_shard_chunks_partition_the_indices():
    for n, b, w in [(0, 3, 2), (1, 4, 3), (7, 2, 2), (10, 3, 4), (12, 4, 3)]:
        parts = [sd.shard_indices(n, b, r, w) for r in range(w)]
        assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))
        # chunks are the same on any world size: the chunks of one process
        assert sorted(c for r in range(w) for c in sd.shard_chunks(n, b, r, w)) == sd.shard_chunks(n, b, 0, 1)


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = sd.init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
    rows = torch.arange(6.0).reshape(3, 2)
    assert sd.gather_rows(rows, 3, 2, ctx=ctx) is rows
    assert sd.all_reduce_sum(5, ctx) == 5


def test_errors(tmp_path):
    gm, sde = _problem()
    with pytest.raises(TypeError, match="seed"):
        sd.sample_sharded(sde, gm, 4, (2,), seed=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        sd.sample_sharded(sde, gm, 4, (2,), batch_size=0)
    with pytest.raises(ValueError, match="num_samples"):
        sd.sample_sharded(sde, gm, 0, (2,))
    with pytest.raises(ValueError, match="gather"):
        sd.sample_sharded(sde, gm, 4, (2,), gather="rank0")
    with pytest.raises(ValueError, match="exactly one"):
        sd.sample_sharded(sde, None, 4, (2,))
    with pytest.raises(ValueError, match="sets x_T"):
        sd.sample_sharded(sde, gm, 4, (2,), x_T=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="map-style dataset"):
        sd.log_likelihood_sharded(sde, gm, iter([torch.zeros(2)]))
    with pytest.raises(ValueError, match="backend"):
        sd.init_distributed("tcp")
    with pytest.raises(ValueError, match="rank"):
        sd.shard_chunks(4, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no shard files"):
        sd.load_shards(str(tmp_path))
    sd.sample_sharded(sde, gm, 3, (2,), seed=1, batch_size=2, method="euler", steps=2, shard_dir=str(tmp_path))
    os.remove(tmp_path / "samples-00000-of-00001.pt")
    torch.save({"indices": torch.tensor([0]), "num_examples": 3, "world_size": 1, "value/samples": torch.zeros(1, 2)},
               tmp_path / "samples-00000-of-00001.pt")
    with pytest.raises(ValueError, match="cover"):
        sd.load_shards(str(tmp_path))
    # two ranks' files of runs with different seeds (a stale file left by an interrupted rerun)
    for rank, seed in ((0, 0), (1, 1)):
        torch.save({"indices": torch.tensor([rank]), "num_examples": 2, "world_size": 2, "rank": rank, "seed": seed,
                    "batch_size": 1, "value/samples": torch.zeros(1, 2)}, tmp_path / f"mix-{rank:05d}-of-00002.pt")
    with pytest.raises(ValueError, match="seeds differ"):
        sd.load_shards(str(tmp_path), prefix="mix")


def test_progress_and_seed_follow_the_library_rules():
    """progress is True or False ("no" is truthy and would show the bar); seed is an int (every rank derives the
    same per-example seeds from it) of any size, so 2^64 + 3 samples as 3 (make_seeds keeps the low 63 bits)."""
    gm, sde = _problem()
    kw = dict(shape=(3, 2), batch_size=2, method="euler", steps=2)
    for fn, args in ((sd.sample_sharded, kw), (sd.log_likelihood_sharded, dict(data=torch.zeros(3, 2)))):
        with pytest.raises(TypeError, match="progress must be True or False; got str 'no'"):
            fn(sde, gm, progress="no", **args)
        with pytest.raises(TypeError, match=r"seed must be an int \(every rank must derive the same per-example "
                                            r"seeds from it\); got float 1.5"):
            fn(sde, gm, seed=1.5, **args)
    assert torch.equal(sd.sample_sharded(sde, gm, seed=2**64 + 3, **kw)["samples"],
                       sd.sample_sharded(sde, gm, seed=3, **kw)["samples"])
    model = sdegen.ScoreModel(sdegen.MLP(2, hidden=8, depth=1), sde, prediction="eps")
    for bad, message in ((torch.Generator(), "seed must be an int"), (None, "seed must be an int")):
        with pytest.raises(TypeError, match=message):
            sd.train_ddp(model, sdegen.dsm_loss, torch.zeros(8, 2), 1, batch_size=4, seed=bad, progress=False)
    with pytest.raises(TypeError, match="progress must be True or False"):
        sd.train_ddp(model, sdegen.dsm_loss, torch.zeros(8, 2), 1, batch_size=4, progress="no")


def test_a_launch_of_several_processes_without_a_group_is_refused(monkeypatch):
    """WORLD_SIZE > 1 without a process group: each process would run the whole job and write the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 .*init_distributed"):
        sd.sample_sharded(sdegen.VPSDE(), sdegen.GaussianMixture.ring(), 4, shape=(2,), batch_size=2, method="ddim",
                          steps=2, seed=0)
    assert not sd.is_main_process()  # torchrun's rank decides before the group exists
    monkeypatch.setenv("RANK", "0")
    assert sd.is_main_process()


def test_a_resumed_train_ddp_call_does_not_replay_the_first_ones_draws():
    """train_ddp takes an int seed on every rank: a call resumed at start_step used to restart the same shuffle and
    loss streams, training again on the first segment's batches and noise. It now draws from (seed, start_step)."""
    seen = []

    def loss_fn(model, batch, gen):
        seen.append((batch.flatten().tolist(), float(torch.rand(1, generator=gen))))
        return model.weight.sum()

    x = torch.arange(16.0)[:, None]
    model = torch.nn.Linear(1, 1, bias=False)
    kw = dict(batch_size=4, seed=0, progress=False, ema_decay=None)
    first = sd.train_ddp(model, loss_fn, x, 4, **kw)
    first_draws = list(seen)
    seen.clear()
    sd.train_ddp(model, loss_fn, x, 4, optimizer=first.optimizer, start_step=first.steps, **kw)
    assert [d[1] for d in seen] != [d[1] for d in first_draws]
    assert [d[0] for d in seen] != [d[0] for d in first_draws]
    again = list(seen)
    seen.clear()
    sd.train_ddp(torch.nn.Linear(1, 1, bias=False), loss_fn, x, 4, start_step=4, **kw)
    assert seen == again  # the same (seed, start_step): the same draws


def test_train_ddp_takes_one_early_stopping_decision_for_all_ranks(run):
    """evaluate's values differ between ranks (1, 2, 3, ... on rank 0; -1, -2, ... on rank 1): averaged, they never
    improve, so both ranks stop after patience = 2 evaluations and restore step 0's weights. Each rank deciding
    alone hung (rank 0 stopped while rank 1 waited in the next all-reduce) or kept different weights."""
    _, ranks = run
    (steps0, best0, evals0, w0), (steps1, best1, evals1, w1) = ranks[0]["early"], ranks[1]["early"]
    assert steps0 == steps1 == 2 and best0 == best1 == 0
    assert evals0 == evals1 == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(w0[k], v) for k, v in _model(init_seed=0).state_dict().items())


def test_sample_sharded_refuses_batch_dependent_noise():
    gm, sde = _problem()
    with pytest.raises(ValueError, match="noise: sample_sharded draws every example's noise from its own seed"):
        sd.sample_sharded(sde, gm, 4, (2,), seed=0, noise="generator", method="euler_maruyama", steps=2)
