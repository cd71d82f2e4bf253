"""Smoke run of the digits example with a few training steps (the full run is in the README, not in CI)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("sklearn")


def test_conditional_generation_smoke(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "conditional_generation.py"), "--digits", "1,7",
           "--train-steps", "3", "--classifier-steps", "3", "--width", "8", "--per-digit", "2", "--steps", "3",
           "--bpd-count", "0", "--threads", "1", "--no-progress", "--out", str(tmp_path), "--batch-size", "16"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for line in ("test accuracy", "assigned to the requested digit", "Frechet distance", "bits/dim"):
        assert line in run.stdout, run.stdout
    for png in ("guided_samples.png", "unguided_samples.png", "inpainting.png"):
        assert os.path.getsize(tmp_path / png) > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("from the cache") == 3, again.stdout
