"""The examples run end to end on tiny configurations (their full runs are recorded in benchmarks/results/), and
the digits example refuses checkpoints whose SHA-256 does not match its manifest."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sdegen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("sklearn")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conditional_generation_trains_loads_and_plots(tmp_path):
    ck = tmp_path / "ck"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "conditional_generation.py"), "--train", "--digits", "1,7",
           "--train-steps", "3", "--classifier-steps", "3", "--width", "8", "--per-digit", "2", "--steps", "3",
           "--scales", "1", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--checkpoints", str(ck),
           "--batch-size", "16", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for line in ("SHA-256 checked", "test accuracy", "scale 0:", "scale 1:", "scale 2:", "Frechet distance"):
        assert line in run.stdout, run.stdout
    for png in ("guided_samples.png", "unguided_samples.png", "inpainting.png", "accuracy_vs_scale.png"):
        assert os.path.getsize(tmp_path / png) > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["accuracy_by_scale"]) == ["0", "1", "2"]
    listed = dict(reversed(line.split()) for line in (ck / "SHA256SUMS").read_text().splitlines())
    assert sorted(listed) == ["clean_classifier.pt", "noisy_classifier.pt", "score_model.pt"]
    for name, digest in listed.items():
        assert hashlib.sha256((ck / name).read_bytes()).hexdigest() == digest


def test_checksum_mismatch_is_refused_before_loading(tmp_path):
    ex = load_example("conditional_generation")
    names = ["a.pt", "b.pt"]
    for n in names:
        (tmp_path / n).write_bytes(os.urandom(256))
    ex.write_manifest(str(tmp_path), names)
    ex.verify_checkpoints(str(tmp_path), names)  # intact: accepted
    data = bytearray((tmp_path / "b.pt").read_bytes())
    data[100] ^= 1  # one flipped bit
    (tmp_path / "b.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch for .*b.pt"):
        ex.verify_checkpoints(str(tmp_path), names)
    os.remove(tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match="a.pt is missing"):
        ex.verify_checkpoints(str(tmp_path), names)
    with pytest.raises(FileNotFoundError, match="--train"):
        ex.verify_checkpoints(str(tmp_path / "nowhere"), names)


def test_shipped_checkpoints_match_their_manifest_and_load(tmp_path):
    ex = load_example("conditional_generation")
    ex.verify_checkpoints(ex.CHECKPOINTS, ex.NAMES.values())
    total = sum(os.path.getsize(os.path.join(ex.CHECKPOINTS, n)) for n in ex.NAMES.values())
    assert total < 10 * 2**20, total
    models = ex.load_models(ex.CHECKPOINTS, "cpu")
    assert models["score"].sde.__class__.__name__ == "VPSDE" and models["noisy"].num_classes == 10
    # a corrupted copy of the shipped folder is refused by the example's own command line, naming the file
    bad = tmp_path / "ck"
    shutil.copytree(ex.CHECKPOINTS, bad)
    with open(bad / "score_model.pt", "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match="checksum mismatch for .*score_model.pt"):
            ex.main(["--checkpoints", str(bad), "--out", str(tmp_path), "--threads", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)


def test_tabular_score_model_starts_as_the_full_covariance_gaussian():
    """On whitened data, EDM's denoiser with sigma_data = 1 and F = 0 is c_skip x, the exact posterior mean of
    N(0, I) data: the untrained model's probability-flow likelihood plus the whitening's log-determinant equals
    the maximum-likelihood Gaussian's log-density (to the ODE tolerance)."""
    ex = load_example("tabular_density")
    train, val, _ = ex.load("wine", 0)
    white = ex.Whitened(train)
    model = ex.build(train.shape[1], 16, 1, "cpu")
    got = ex.nll(model, white(val, "cpu"), white, 1e-5)
    assert abs(got - ex.gaussian_nll(train, [val])[0]) < 2e-3, got


def test_tabular_density_smoke(tmp_path):
    ex = load_example("tabular_density")
    out = tmp_path / "tabular.md"
    (row,) = ex.main(["--quick", "--datasets", "wine", "--out", str(out), "--device", "cpu"])
    text = out.read_text()
    assert text.count("| wine (108/35/35, 13) |") == 4 and "Written by" in text
    values = row["gauss"] + row["mixture"]["bic"][0] + row["mixture"]["val"][0] + row["score"]
    assert all(abs(v) < 10 for v in values), values
    # the starting weights (the Gaussian) compete in the early stopping, so validation NLL is never worse
    assert row["score"][1] <= row["gauss"][1] + 5e-3, (row["score"], row["gauss"])


def test_digits_training_starts_from_seeded_weights_and_leaves_the_global_generator_alone():
    ex = load_example("conditional_generation")
    state = torch.random.get_rng_state()
    a = ex.seeded(sdegen.UNet, 5, 1, 8).state_dict()
    b = ex.seeded(sdegen.UNet, 5, 1, 8).state_dict()
    c = ex.seeded(sdegen.UNet, 6, 1, 8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)
