"""Tests of sdegen.schedules.refine_grid (the other schedules are tested with the sampling driver)."""

import pytest
import torch

import sdegen
from sdegen.schedules import refine_grid


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VPSDE(schedule="cosine"), sdegen.SubVPSDE(), sdegen.VESDE()])
def test_refined_log_snr_grid_is_the_finer_log_snr_grid(sde):
    """Splitting each of 5 equal log-SNR steps in 3 gives the 15-step log-SNR grid; the old times are kept
    exactly; a warped grid stays strictly decreasing with its end points."""
    coarse = sdegen.time_grid(sde, 5, "log_snr")
    fine = refine_grid(sde, coarse, 3)
    assert fine.dtype == torch.float64 and fine.shape == (16,)
    torch.testing.assert_close(sde.log_snr(fine), sde.log_snr(sdegen.time_grid(sde, 15, "log_snr")),
                               rtol=0, atol=1e-9)
    assert torch.equal(fine[::3], coarse)
    warped = refine_grid(sde, sdegen.time_grid(sde, 7, "few_step"), 2)
    assert bool((warped[1:] < warped[:-1]).all()) and warped[0] == sde.T and warped[-1] == sde.t_min
    assert torch.equal(refine_grid(sde, coarse, 1), coarse)


def test_refine_grid_rejects_bad_input():
    sde = sdegen.VPSDE()
    with pytest.raises(ValueError, match="factor"):
        refine_grid(sde, sdegen.time_grid(sde, 4), 0)
    with pytest.raises(ValueError, match="decreasing"):
        refine_grid(sde, torch.tensor([0.1, 0.5]))
