"""The model layer: a network, what it predicts and how it wants its inputs, seen by samplers through one contract.

The contract (:class:`Model`) is a pair of exact views of one prediction under an SDE with kernel
x_t = m x_0 + s eps (m = m(t), s = s(t), sigma = s/m):

    score(x, t) = grad_x log p_t(x),     denoise(x, t) = D(x, t) = E[x_0 | x_t = x] = (x + s^2 score) / m.

Samplers of the SDE view (Euler-Maruyama, reverse diffusion, Langevin) ask for the score, the exponential and
Karras-style samplers for the denoiser; each parameterisation converts its own output to either directly:

    eps   (Ho et al. 2020):                 score = -eps / s,             D = (x - s eps) / m
    x0    (data prediction):                score = (m x0 - x) / s^2,     D = x0
    v     (v = m eps - s x0, Salimans & Ho 2022):   D = (m x - s v) / (m^2 + s^2)
    flow  (v = dx_t/dt = m' x0 + s' eps, Lipman et al. 2023; = eps - x0 for :class:`sdegen.FlowSDE`):
                                            D = (s' x - s v) / (s' m - s m')
    edm   (Karras et al. 2022, eq. 7):      D = c_skip x_in + c_out F(c_in x_in, c_noise), x_in = x / m

Mixed precision as EDM does it: the sampler's state keeps its dtype (float32 or float64); the network's inputs are
cast to the dtype of its parameters (bfloat16, float16, ...) and its output back, and every conversion runs in
the state's dtype.
"""

from __future__ import annotations

import re
import warnings
import weakref
from typing import Any, Callable, Optional, Tuple, Union

import torch

from ._util import Time, batch_time, bcast
from ._validate import check_choice, check_flag, check_int, check_number, reject_inapplicable
from .sde import SDE

PREDICTIONS = ("score", "eps", "x0", "v", "flow", "edm")
TIME_INPUTS = ("t", "sigma", "log_sigma", "edm_sigma", "index", "timestep")
PRECONDITIONINGS = ("edm", "vp", "ve")


_TABLE_LIMIT = 16384  # entries of a model's per-time tables (a grid of 1000 steps takes 1001)
_ROW_TABLES = 4  # (dtype, batch) pairs whose (B,) time rows a model keeps


def _host_scalar(t: torch.Tensor) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 0 and t.device.type == "cpu" and not t.requires_grad


def coefficient(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor, x: torch.Tensor):
    """fn(t) ready to multiply x: a Python float for a host scalar time (the grid times of fixed-step samplers; a
    float multiplies x on any device with no host-device copy), else fn(t) shaped (B, 1, ...) in x's dtype."""
    return bcast(fn(t), x)


def batch_time_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A 0-d or (B,) time as a (B,) tensor in x's dtype and device (a host scalar fills it in one launch)."""
    if _host_scalar(t):
        return torch.full(x.shape[:1], float(t), dtype=x.dtype, device=x.device)
    return batch_time(t, x).to(x.dtype)


class Model(torch.nn.Module):
    """The contract between a model and the samplers: exact ``score(x, t)`` and ``denoise(x, t)`` under ``sde``.

    x is (B, ...), t a (B,) tensor (or a float / 0-d tensor); outputs have x's shape and dtype. A subclass
    implements :meth:`score` or :meth:`denoise` (the other follows from Tweedie's formula). Attributes the
    sampling driver reads: ``nfe_per_call`` (network evaluations one call costs, 1 by default) and
    ``classifier_calls`` (classifier-gradient evaluations one call costs, 0 by default).
    """

    nfe_per_call: int = 1
    classifier_calls: int = 0

    def __init__(self, sde: SDE):
        super().__init__()
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be an sdegen.SDE instance (e.g. sdegen.VPSDE()); got {sde!r}.")
        if type(self).score is Model.score and type(self).denoise is Model.denoise:
            raise TypeError(f"{type(self).__name__} must implement score(x, t) or denoise(x, t) (the other follows "
                            "from Tweedie's formula).")
        self.sde = sde.check_contract()

    def rows(self, index: torch.Tensor) -> "Model":
        """This model for the examples ``index`` (a 1-D index tensor) of the batch it serves: what a solve that sets
        failed examples aside (``on_failure="mask"``) runs the others with. A model holding per-example data (a
        guided model's labels) returns a copy restricted to those rows; the default, for models whose examples are
        independent, is the model itself."""
        return self

    def prepare(self, ts: torch.Tensor) -> None:
        """Called by the sampling driver with a run's grid times (1-D float64, on the CPU) before the first step
        (and by samplers with their stage times): m and s at every new time in one vectorised call, so that a step's
        conversion costs a table look-up; the grid also makes the (B,) time inputs of :meth:`batch_time` in one
        launch at the first call. The same grid again adds nothing; the tables are bounded."""
        if not _host_scalar(ts[0]):
            return
        table = self._coeff_table()
        values = ts.tolist()
        new = [i for i, v in enumerate(values) if v not in table]
        if new:
            if len(table) + len(new) > _TABLE_LIMIT:
                table.clear()
            t64 = ts.double()[new] if len(new) < len(values) else ts.double()
            table.update(zip((values[i] for i in new), zip(self.sde.mean_coeff(t64).tolist(),
                                                           self.sde.std(t64).tolist())))
        grids = self.__dict__.setdefault("_grids", [])  # the latest few: a run's grid and its stage times
        if not any(g[1] == values for g in grids):
            grids.append((ts, values, set(values)))
            del grids[:-_ROW_TABLES]

    def _coeff_table(self) -> dict:
        """time value -> (m, s) of this model's SDE, as Python floats: a table that belongs to the SDE object it was
        made for (a model given another SDE starts a new one)."""
        held = self.__dict__.get("_coeff_tables")
        if held is None or held[0] is not self.sde:
            held = self.__dict__["_coeff_tables"] = (self.sde, {})
        return held[1]

    def _host_value(self, t: torch.Tensor) -> float:
        """float(t) of a host scalar time, read once per tensor and version: a model call asks for it twice."""
        if t.is_inference():  # an inference tensor keeps no version counter
            return float(t)
        last = self.__dict__.get("_last_time")
        if last is not None and last[0] is t and last[1] == t._version:
            return last[2]
        value = float(t)
        self.__dict__["_last_time"] = (t, t._version, value)
        return value

    def batch_time(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A 0-d or (B,) time as the (B,) tensor in x's dtype and device that a network receives.

        On the CPU, a prepared time (see :meth:`prepare`) comes as a broadcast view of a per-model table made in
        one launch for all prepared times: a step then makes no tensor at all. Such a view is read-only (an in-place
        operation on it raises, since its B entries share one element), so a network cannot alter a later call's
        time. Elsewhere, and for a batch of one, a host scalar fills a new tensor in one launch."""
        if not _host_scalar(t):
            return batch_time(t, x).to(x.dtype)
        return self._host_row(self._host_value(t), x)

    def _host_row(self, value: float, x: torch.Tensor) -> torch.Tensor:
        """:meth:`batch_time` of the host scalar time ``value``."""
        batch = x.shape[0]
        if x.device.type != "cpu" or batch < 2:
            return torch.full((batch,), value, dtype=x.dtype, device=x.device)
        tables = self.__dict__.setdefault("_time_rows", {})  # (dtype, batch) -> {value: row}, the latest few
        rows = tables.get((x.dtype, batch))
        if rows is None:
            while len(tables) >= _ROW_TABLES:
                tables.pop(next(iter(tables)))
            rows = tables[(x.dtype, batch)] = {}
        row = rows.get(value)
        if row is None:
            grid = next((g for g in reversed(self.__dict__.get("_grids", ())) if value in g[2]), None)
            if grid is None:
                return torch.full((batch,), value, dtype=x.dtype, device=x.device)
            if len(rows) + len(grid[1]) > _TABLE_LIMIT:
                rows.clear()
            made = dict(zip(grid[1], (r.expand(batch) for r in grid[0].to(x.dtype).unbind())))  # one launch
            rows.update(made)
            row = made[value]
        return row

    def _tabled(self, x: torch.Tensor, t: Any) -> Optional[Tuple[float, float, float]]:
        """(value, m, s) of a host scalar time in [0, T] whose coefficients this model has tabled (every grid time
        after :meth:`prepare`) and where s > 0, as Python floats: what checking such a time amounts to, a few
        comparisons; None for any other time (a (B,) or device tensor, a float, a time outside the table)."""
        if not (_host_scalar(t) and t.is_floating_point() and x.ndim):
            return None
        value = float(t)
        hit = self._coeff_table().get(value)
        if hit is None or not (hit[1] > 0.0 and 0.0 <= value <= self.sde.T):
            return None
        return value, hit[0], hit[1]

    def _coeffs(self, x: torch.Tensor, t: torch.Tensor):
        """(m, s) at t, ready to multiply x (see :func:`coefficient`); host scalar times hit a small table, since
        fixed-step samplers ask for the same grid times again and again."""
        if not _host_scalar(t):
            return bcast(self.sde.mean_coeff(t), x), bcast(self.sde.std(t), x)
        table = self._coeff_table()
        value = self._host_value(t)
        hit = table.get(value)
        if hit is None:
            if len(table) >= _TABLE_LIMIT:
                table.clear()
            t64 = t.double()  # the table serves every dtype: its values are float64's
            hit = table[value] = (float(self.sde.mean_coeff(t64)), float(self.sde.std(t64)))
        return hit

    def _check_positive_std(self, s) -> None:
        """ValueError where Tweedie's formula divides by s(t) = 0 (a host or CPU time; a device time is not read
        back)."""
        zero = (s == 0.0) if isinstance(s, float) else (s.device.type == "cpu" and bool((s == 0).any()))
        if zero:
            raise ValueError(f"t must be where the kernel's std s(t) > 0: {type(self).__name__}'s conversion between "
                             "the score and the denoiser divides by it; got a t where s(t) = 0. Samplers and "
                             "log_likelihood stop at t_min > 0.")

    def score(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """grad_x log p_t(x) = (m D - x) / s^2."""
        t = self.sde.check_time_for(x, t)
        m, s = self._coeffs(x, t)
        self._check_positive_std(s)
        return (m * _checked_view(self.denoise(x, t, *args, **kwargs), x, self, "denoise") - x) / s**2

    def denoise(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """Tweedie's posterior mean E[x_0 | x_t = x] = (x + s^2 score) / m."""
        t = self.sde.check_time_for(x, t)
        m, s = self._coeffs(x, t)
        return (x + s**2 * _checked_view(self.score(x, t, *args, **kwargs), x, self, "score")) / m

    def eps(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """The implied noise estimate -s(t) score = (x - m D) / s."""
        t = self.sde.check_time_for(x, t)
        return -coefficient(self.sde.std, t, x) * self.score(x, t, *args, **kwargs)

    def forward(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """Calling a model gives its score."""
        return self.score(x, t, *args, **kwargs)


class CountingModel(Model):
    """``model`` with a running count of what its calls cost: ``nfe`` network evaluations and ``classifier_nfe``
    classifier gradients (``model.nfe_per_call`` and ``model.classifier_calls`` per call). What a pilot that calls
    the model outside a sampling run (a vector-Jacobian product, a forward difference) spends, counted where it is
    spent."""

    def __init__(self, model: Model, _counts: Optional[list] = None):
        super().__init__(model.sde)
        self.inner = model
        self.nfe_per_call, self.classifier_calls = model.nfe_per_call, model.classifier_calls
        self._counts = [0, 0] if _counts is None else _counts  # shared with the restrictions of :meth:`rows`

    @property
    def nfe(self) -> int:
        return self._counts[0]

    @property
    def classifier_nfe(self) -> int:
        return self._counts[1]

    def _count(self) -> None:
        self._counts[0] += self.nfe_per_call
        self._counts[1] += self.classifier_calls

    def score(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        self._count()
        return self.inner.score(x, t)

    def denoise(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        self._count()
        return self.inner.denoise(x, t)

    def prepare(self, ts: torch.Tensor) -> None:
        self.inner.prepare(ts)

    def rows(self, index: torch.Tensor) -> "CountingModel":
        return CountingModel(self.inner.rows(index), self._counts)


# what PyTorch's kernels say when a tensor meets parameters of another dtype (matmul, convolution, indexing, ...)
_DTYPE_MISMATCH = re.compile(r"dtype|scalar type|(input|weight|bias) type|same type", re.IGNORECASE)


# where each optional ScoreModel setting has an effect (elsewhere it is refused, not ignored)
_SETTING_SCOPE = {"num_steps": "time_input='index'", "preconditioning": "prediction='edm'",
                  "sigma_data": "prediction='edm' with preconditioning='edm'",
                  "M": "prediction='edm' with preconditioning='vp'"}


def settings_that_apply(prediction: str, time_input: Any, preconditioning: Optional[str]) -> Tuple[str, ...]:
    """The optional :class:`ScoreModel` settings (``num_steps``, ``preconditioning``, ``sigma_data``, ``M``) that
    have an effect for this prediction, time input and preconditioning (None: EDM's own)."""
    edm = prediction == "edm"
    applies = {"num_steps": time_input == "index", "preconditioning": edm,
               "sigma_data": edm and preconditioning in (None, "edm"), "M": edm and preconditioning == "vp"}
    return tuple(name for name, used in applies.items() if used)


def network_dtype(net: Any) -> Optional[torch.dtype]:
    """The dtype of a module's first floating-point parameter (None for a plain function or a module without any)."""
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


class ScoreModel(Model):
    """Wraps ``net(x_net, time_input, *args, **kwargs)`` as a :class:`Model`; calling it gives the score.

    Args:
        net: the network (any callable); extra call arguments (a class label, say) are passed through.
        sde: the forward SDE whose kernel defines the conversions.
        prediction: what the network outputs: "score", "eps", "x0", "v", "flow" (the velocity dx_t/dt of the
            kernel's interpolation, eps - x0 under :class:`sdegen.FlowSDE`) or "edm" (EDM's raw network F inside
            the preconditioned denoiser; see ``preconditioning``). See the module docstring for the formulas.
        time_input: what the network takes as its second argument: "t", "sigma" (the kernel std s(t)),
            "log_sigma", "edm_sigma" (s/m), "index" (round(t / T (num_steps - 1))), "timestep" (the exact
            fractional timestep of a :class:`sdegen.DiscreteVPSDE`) or a callable t -> input. Default: "t",
            or c_noise for prediction="edm".
        num_steps: N for time_input="index" (default 1000; only with that time input).
        scale_input: False: the network sees the state x (score_sde, DDPM and diffusers networks); True: it sees
            x_in = x / m(t), the scaled input that EDM and k-diffusion networks are trained on. prediction="edm"
            always scales (its formula is written in x_in).
        sigma_data: EDM's data standard deviation (prediction="edm", preconditioning="edm"; default 0.5).
        preconditioning: the c_skip, c_out, c_in, c_noise of EDM's table 1 for prediction="edm": "edm"
            (sigma_data; the default), "vp" (c_noise = (M - 1) t, for a network trained under VPSDE's time) or "ve"
            (c_noise = log(sigma / 2)).
        M: the number of VP timesteps of preconditioning="vp" (default 1000, as in EDM).
        An option given where it has no effect (``sigma_data`` without EDM's own preconditioning, ``num_steps``
        without time_input="index", ...) raises a ValueError rather than being ignored.

    The network runs in the dtype of its own parameters: a bfloat16 network under a float32 or float64 state gets
    its inputs cast and returns outputs cast back (floating time inputs go as float32 to 16-bit networks).
    ``cast_input`` chooses: True (the default) casts to the parameters' dtype; False calls the network in the
    state's dtype (a wrapper that casts for its inner network itself, as EDM's ``EDMPrecond`` does, keeps its skip
    connection c_skip x in the state's precision that way); "auto" calls it in the state's dtype and switches to
    casting for good if the network fails on a dtype mismatch.
    Shapes: x is (B, ...), t a float, 0-d or (B,) tensor; outputs have x's shape and dtype.
    Times: a network is asked only where its conversions are defined: s(t) > 0 (the kernel's std; every
    parameterisation but "score" divides by it) and, for time_input="timestep", t >= 1 / N, the time of the
    table's first timestep (a DDPM network has not seen negative timesteps). Host and CPU times outside raise a
    ValueError; times on an accelerator are not read back to check.
    """

    def __init__(self, net: Callable, sde: SDE, prediction: str = "eps",
                 time_input: Union[str, Callable[[torch.Tensor], torch.Tensor], None] = None,
                 num_steps: Optional[int] = None, *, scale_input: bool = False, sigma_data: Optional[float] = None,
                 preconditioning: Optional[str] = None, M: Optional[int] = None,
                 cast_input: Union[bool, str] = True):
        super().__init__(sde)
        if cast_input not in (True, False, "auto") or not isinstance(cast_input, (bool, str)):
            raise ValueError(f"cast_input must be True, False or 'auto'; got {cast_input!r}.")
        self.cast_input = cast_input
        if not callable(net):
            raise TypeError(f"net must be a callable network net(x, time_input, ...); got {type(net).__name__}.")
        check_choice(prediction, "prediction", PREDICTIONS)
        if time_input is None:
            time_input = "c_noise" if prediction == "edm" else "t"
        elif not callable(time_input) and time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS} or a callable; got {time_input!r}.")
        if time_input == "timestep" and not hasattr(sde, "timestep"):
            raise ValueError(f"time_input='timestep' needs an SDE with discrete timesteps (sdegen.DiscreteVPSDE); "
                             f"got {type(sde).__name__}.")
        if time_input == "index" and hasattr(sde, "timestep"):
            raise ValueError("time_input='index' is score_sde's round(t / T (N - 1)) for a continuous SDE; on a DDPM "
                             "table (DiscreteVPSDE) it is one step off for the first half of the table (step k + 1 "
                             "for k): use time_input='timestep', the table's own step tN - 1.")
        if time_input == "timestep" and sde.t_min < (1.0 - 1e-12) / sde.num_timesteps:
            raise ValueError(f"sde.t_min = {sde.t_min:g} lies before the table's first timestep (t = 1/N = "
                             f"{1.0 / sde.num_timesteps:g}): a network on timesteps would be asked at negative ones "
                             "when the samplers reach t_min; build the DiscreteVPSDE with t_min >= 1/N (its default).")
        check_flag(scale_input, "scale_input")
        if preconditioning is not None:
            check_choice(preconditioning, "preconditioning", PRECONDITIONINGS)
        used = settings_that_apply(prediction, time_input, preconditioning)
        for name, value in (("num_steps", num_steps), ("preconditioning", preconditioning),
                            ("sigma_data", sigma_data), ("M", M)):
            if name not in used:
                reject_inapplicable({name: value}, f"it applies to {_SETTING_SCOPE[name]} only")
        check_int(num_steps, "num_steps", lo=2, none_ok=True, hint=" (the N of time_input='index')")
        preconditioning = "edm" if preconditioning is None else preconditioning
        sigma_data, M = 0.5 if sigma_data is None else sigma_data, 1000 if M is None else M
        check_number(sigma_data, "sigma_data", lo=0.0, lo_open=True)
        check_int(M, "M", lo=1, hint=" (the number of VP timesteps of preconditioning='vp')")
        self.net, self.prediction, self.time_input = net, prediction, time_input
        self.num_steps = 1000 if num_steps is None else num_steps
        self.scale_input = scale_input or prediction == "edm"
        self.sigma_data, self.preconditioning, self.M = float(sigma_data), preconditioning, int(M)

    # --- the network call ---
    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network receives for times t."""
        kind = self.time_input
        if callable(kind):
            return kind(t)
        if kind == "t":
            return t
        if kind == "sigma":
            return self.sde.std(t)
        if kind == "log_sigma":
            return torch.log(self.sde.std(t))
        if kind == "edm_sigma":
            return self.sde.sigma(t)
        if kind == "timestep":
            return self.sde.timestep(t)
        if kind == "c_noise":
            return self._edm_coeffs(t)[3]
        return torch.round(t / self.sde.T * (self.num_steps - 1)).long()

    def _edm_coeffs(self, t: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) of EDM's table 1 at sigma = s/m, in t's dtype."""
        sigma = self.sde.sigma(t)
        if self.preconditioning == "vp":
            return torch.ones_like(sigma), -sigma, 1.0 / torch.sqrt(sigma**2 + 1.0), (self.M - 1) * t
        if self.preconditioning == "ve":
            return torch.ones_like(sigma), sigma, torch.ones_like(sigma), torch.log(0.5 * sigma)
        sd2 = self.sigma_data**2
        root = torch.sqrt(sigma**2 + sd2)
        return sd2 / root**2, sigma * self.sigma_data / root, 1.0 / root, 0.25 * torch.log(sigma)

    def _edm_skip_deficit(self, t: torch.Tensor) -> torch.Tensor:
        """1 - c_skip, computed without the cancellation: sigma^2 / (sigma^2 + sigma_data^2) for EDM's own
        preconditioning, 0 for "vp" and "ve" (c_skip = 1)."""
        sigma = self.sde.sigma(t)
        if self.preconditioning in ("vp", "ve"):
            return torch.zeros_like(sigma)
        return sigma**2 / (sigma**2 + self.sigma_data**2)

    def raw(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        """The network's own output at (x, t) (EDM's F for prediction="edm"), in x's dtype."""
        t, at = self._checked(x, t)
        return self._raw(x, t, at, args, kwargs)

    def output_to_denoised(self, out: torch.Tensor, x: torch.Tensor, t: Time) -> torch.Tensor:
        """D = E[x_0 | x_t = x] from a raw output of this model's kind (exact kernel formulas)."""
        _check_output(out, x)
        return self._denoised(out, x, self.sde.check_time_for(x, t))

    def output_to_score(self, out: torch.Tensor, x: torch.Tensor, t: Time) -> torch.Tensor:
        """The score from a raw output of this model's kind."""
        _check_output(out, x)
        return self._score(out, x, self.sde.check_time_for(x, t))

    # --- the contract ---
    def score(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        t, at = self._checked(x, t)
        return self._score(self._raw(x, t, at, args, kwargs), x, t, at)

    def denoise(self, x: torch.Tensor, t: Time, *args, **kwargs) -> torch.Tensor:
        t, at = self._checked(x, t)
        return self._denoised(self._raw(x, t, at, args, kwargs), x, t, at)

    def _checked(self, x: torch.Tensor, t: Time):
        """(t, its tabled (value, m, s) or None) once t is known to lie where the network may be asked: in [0, T],
        where s(t) > 0 and, for discrete timesteps, at or after the first one. A tabled grid time (see
        :meth:`Model._tabled`) is checked by comparing its floats; any other time by the SDE and
        :meth:`_check_network_time`."""
        at = self._tabled(x, t)
        if at is not None and (self.time_input != "timestep" or at[0] * self.sde.num_timesteps >= 1.0):
            return t, at
        t = self.sde.check_time_for(x, t)
        self._check_network_time(x, t)
        return t, None

    # --- the same with t already checked (one check per call of the contract); ``at`` is t's tabled
    # (value, m, s) or None ---
    def _raw(self, x: torch.Tensor, t: torch.Tensor, at, args, kwargs) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (float32 or float64); got {x.dtype}.")
        tb = self.batch_time(t, x) if at is None else self._host_row(at[0], x)
        x_net = x / coefficient(self.sde.mean_coeff, t, x) if self.scale_input else x
        if self.prediction == "edm":
            x_net = x_net * bcast(self._edm_coeffs(tb)[2], x)
        time_in = self.net_time(tb)
        try:
            out = self._call_net(x_net, time_in, self.cast_input is True, args, kwargs)
        except RuntimeError as err:  # a plain function closing over a network of another dtype, say
            if not _DTYPE_MISMATCH.search(str(err)):
                raise
            own = network_dtype(self.net)
            if self.cast_input == "auto" and own not in (None, x_net.dtype):
                try:  # "auto": the network may want its own dtype
                    out = self._call_net(x_net, time_in, True, args, kwargs)
                except RuntimeError as again:
                    if not _DTYPE_MISMATCH.search(str(again)):
                        raise
                    raise TypeError(self._dtype_advice(x_net.dtype, err) + f" Called in its parameters' dtype {own} "
                                    f"it failed too ({again}): a wrapper that scales its input in another dtype (a "
                                    "k-diffusion Denoiser) must cast inside, around its network.") from again
                self.cast_input = True  # from this call on
            elif not isinstance(self.net, torch.nn.Module) or (self.cast_input is False and own != x_net.dtype):
                raise TypeError(self._dtype_advice(x_net.dtype, err)) from err
            else:  # a module called in its own dtype: the mismatch is elsewhere (extra arguments are not cast)
                raise
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"the model's network {_name(self.net)} must return a tensor (floating-point); got {got}.")
        _check_output(out, x, self.net)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _call_net(self, x_net: torch.Tensor, time_in: torch.Tensor, cast: bool, args, kwargs) -> Any:
        """The network's output at (x_net, time_in), its inputs cast to its parameters' dtype if ``cast``."""
        dtype = network_dtype(self.net) if cast else None
        if dtype is not None and dtype != x_net.dtype:
            x_net = x_net.to(dtype)
        if dtype is not None and time_in.is_floating_point():
            time_in = time_in.to(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
        return self.net(x_net, time_in, *args, **kwargs)

    def _dtype_advice(self, dtype: torch.dtype, err: Exception) -> str:
        """The message of a network that failed on a dtype mismatch, with the fix that applies."""
        head = f"the model's network {_name(self.net)} failed on a {dtype} input: {err}. "
        if self.cast_input is False:
            return head + ("cast_input=False calls it in the state's dtype; pass cast_input=True (or 'auto') to "
                           "call it in its parameters' dtype.")
        return head + ("Extra arguments (labels, conditioning) are passed as given. A plain function (a lambda "
                       "around a network, say) is called in the state's dtype, which "
                       "sdegen.sample keeps float32 or float64: pass the nn.Module itself (ScoreModel(net, ...), "
                       "from_diffusers(unet, ...), from_denoiser(denoiser, ...)), whose inputs are then cast to its "
                       "parameters' dtype, or make the function cast its inputs.")

    def _check_network_time(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """ValueError where the network is asked at s(t) = 0 or, for discrete timesteps, before the table's first
        one. A host scalar time reads the per-time table of (m, s); a CPU tensor is compared directly; times on
        an accelerator are left unchecked (reading them back would stall the device)."""
        if t.numel() == 0:  # an empty batch: nothing is asked
            return
        # a score network is asked at s = 0 unless its time input is log s (or EDM's c_noise), -inf there
        divides = self.prediction != "score" or self.time_input in ("log_sigma", "c_noise")
        if self.time_input == "timestep":  # timestep t N - 1 below 0 beyond its rounding (DiscreteVPSDE.timestep)
            n = self.sde.num_timesteps
            first = (1.0 - 4.0 * n * torch.finfo(t.dtype).eps) / n
        if _host_scalar(t):
            value = self._host_value(t)
            early = self.time_input == "timestep" and value < first
            if not early and (not divides or self._coeffs(x, t)[1] > 0.0):
                return
        elif t.device.type == "cpu":
            low = t.detach().min()
            early = self.time_input == "timestep" and bool(low < first)
            if not early and (not divides or bool(self.sde.std(low) > 0)):  # s(t) increases with t
                return
            value = float(low)
        else:
            return
        if early:
            raise ValueError(f"t must be >= {1.0 / self.sde.num_timesteps:g}, the time of the network's first "
                             f"timestep (timestep 0 of the {self.sde.num_timesteps}-step table); got t = {value:g} "
                             f"(timestep {value * self.sde.num_timesteps - 1:g}). Pass t_min >= "
                             f"{1.0 / self.sde.num_timesteps:g}.")
        raise ValueError(f"t must be where the kernel's std s(t) > 0: the network's conversions (or its time input "
                         f"{self.time_input!r}) divide by it or take its log; got t = {value:g}, where s(t) = 0. "
                         "Samplers and log_likelihood stop at t_min > 0.")

    def _denoised(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, at=None) -> torch.Tensor:
        if self.prediction == "edm":
            c_skip, c_out, _, _ = self._edm_coeffs(self.batch_time(t, x))
            return bcast(c_skip, x) * (x / coefficient(self.sde.mean_coeff, t, x)) + bcast(c_out, x) * out
        if self.prediction == "flow":
            m, s = self._coeffs(x, t)
            dm, ds = coefficient(self.sde.d_mean_coeff, t, x), coefficient(self.sde.d_std, t, x)
            return (ds * x - s * out) / (ds * m - s * dm)
        return _x0_from(self.prediction, out, x, *(self._coeffs(x, t) if at is None else at[1:]))

    def _score(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, at=None) -> torch.Tensor:
        if self.prediction == "score":
            return out
        m, s = self._coeffs(x, t) if at is None else at[1:]
        if self.prediction in ("eps", "x0", "v"):
            return _score_from(self.prediction, out, x, m, s)
        # (m D - x) / s^2 written without forming D, whose x-term cancels against x at small s (in float32 that
        # left a relative score error of |x| eps / s^2 beside the output's own rounding)
        if self.prediction == "edm":  # m D - x = m c_out F - (1 - c_skip) x
            tb = self.batch_time(t, x)
            _, c_out, _, _ = self._edm_coeffs(tb)
            return (m * bcast(c_out, x) * out - bcast(self._edm_skip_deficit(tb), x) * x) / s**2
        dm, ds = coefficient(self.sde.d_mean_coeff, t, x), coefficient(self.sde.d_std, t, x)
        return (dm * x - m * out) / (s * (ds * m - s * dm))  # flow: m D - x = s (m' x - m F) / (s' m - s m')

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, time_input={self.time_input!r}, scale_input={self.scale_input}"


def _score_from(prediction: str, out: torch.Tensor, x: torch.Tensor, m, s) -> torch.Tensor:
    if prediction == "score":
        return out
    if prediction == "eps":
        return -out / s
    if prediction == "x0":
        return torch.sub(out, x, alpha=1.0 / m).mul_(m / (s * s)) if isinstance(m, float) else (m * out - x) / s**2
    if prediction == "v":
        return -((s * x + m * out) / (m**2 + s**2)) / s
    raise ValueError(f"prediction must be one of ('score', 'eps', 'x0', 'v'); got {prediction!r}.")


def _x0_from(prediction: str, out: torch.Tensor, x: torch.Tensor, m, s) -> torch.Tensor:
    scalar = isinstance(m, float)  # Python-float coefficients: fused multiply-adds, in place on the new tensor
    if prediction == "score":
        return torch.add(x, out, alpha=s * s).div_(m) if scalar else (x + s**2 * out) / m
    if prediction == "eps":
        return torch.add(x, out, alpha=-s).div_(m) if scalar else (x - s * out) / m
    if prediction == "x0":
        return out
    if prediction == "v":
        return (m * x - s * out) / (m**2 + s**2)
    raise ValueError(f"prediction must be one of ('score', 'eps', 'x0', 'v'); got {prediction!r}.")


def _name(net: Any) -> str:
    return getattr(net, "__name__", None) or type(net).__name__


def _checked_view(out: Any, x: torch.Tensor, model: "Model", what: str) -> torch.Tensor:
    """A model's own score or denoiser, checked before Tweedie's formula turns it into the other view (which would
    broadcast a wrong shape into one that passes every later check)."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{type(model).__name__}.{what}(x, t) must return x's shape {tuple(x.shape)}; got {got}.")
    return out


def _check_output(out: torch.Tensor, x: torch.Tensor, net: Any = None) -> None:
    if out.shape != x.shape:
        who = f"the model's network {_name(net)}" if net is not None else "the network output"
        raise ValueError(f"{who} must return x's shape {tuple(x.shape)}; got {tuple(out.shape)} (outputs are not "
                         "broadcast).")


def _check_conversion(sde: SDE, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, divides: bool) -> None:
    """What every conversion needs: an output of x's shape and, where it divides by s(t), s(t) > 0 (host times are
    checked; times on an accelerator are not read back)."""
    _check_output(out, x)
    if divides and t.device.type == "cpu" and bool((sde.std(t) <= 0).any()):
        raise ValueError(f"t must be where the kernel's std s(t) > 0 (the conversion divides by it); got t = "
                         f"{float(t.min()):g}.")


def output_to_score(sde: SDE, prediction: str, out: torch.Tensor, x: torch.Tensor, t: Time) -> torch.Tensor:
    """Convert a network output of kind ``prediction`` ("score", "eps", "x0" or "v") at (x, t) into the score, in
    x's dtype."""
    t = sde.check_time_for(x, t)
    _check_conversion(sde, out, x, t, prediction != "score")
    if prediction == "score":
        return out.to(x.dtype)
    return _score_from(prediction, out, x, coefficient(sde.mean_coeff, t, x), coefficient(sde.std, t, x)).to(x.dtype)


def output_to_x0(sde: SDE, prediction: str, out: torch.Tensor, x: torch.Tensor, t: Time) -> torch.Tensor:
    """Convert a network output of kind ``prediction`` ("score", "eps", "x0" or "v") into E[x_0 | x_t = x], in x's
    dtype."""
    t = sde.check_time_for(x, t)
    _check_conversion(sde, out, x, t, False)  # divides by m(t) > 0 only
    return _x0_from(prediction, out, x, coefficient(sde.mean_coeff, t, x), coefficient(sde.std, t, x)).to(x.dtype)


def score_to_x0(sde: SDE, score: torch.Tensor, x: torch.Tensor, t: Time) -> torch.Tensor:
    """Tweedie's formula E[x_0 | x_t = x] = (x + s(t)^2 score) / m(t), in x's dtype (score of x's shape)."""
    t = sde.check_time_for(x, t)
    _check_output(score, x)
    return ((x + coefficient(sde.std, t, x) ** 2 * score) / coefficient(sde.mean_coeff, t, x)).to(x.dtype)


def _same_sde(a: SDE, b: SDE) -> bool:
    """Whether a model built for ``a`` may serve ``b``: the same class and config, and the same kernel (m, s) on a
    few times, which tells apart instances of a user SDE whose config() does not record its parameters."""
    if a is b:
        return True
    verdicts = a.__dict__.setdefault("_same_as", {})  # per pair of instances: the comparison runs once
    held = verdicts.get(id(b))
    if held is not None and held[0]() is b:
        return held[1]
    same = type(a) is type(b) and _configs_agree(a, b) and _kernels_agree(a, b)
    if len(verdicts) > 64:
        verdicts.clear()
    verdicts[id(b)] = (weakref.ref(b), same)
    return same


def _configs_agree(a: SDE, b: SDE) -> bool:
    """Equal configs; an SDE that cannot describe itself leaves the verdict to the kernels."""
    try:
        return a.config() == b.config()
    except Exception:  # noqa: BLE001 - a user's config() may fail in any way
        return True


def _kernels_agree(a: SDE, b: SDE) -> bool:
    """Equal T and equal (log m, s) at four float64 times; kernels that cannot be evaluated there leave the verdict
    to the config."""
    t = torch.linspace(0.0, a.T, 5, dtype=torch.float64)[1:]
    try:
        return a.T == b.T and bool(torch.equal(a.log_mean_coeff(t), b.log_mean_coeff(t))
                                   and torch.equal(a.std(t), b.std(t)))
    except Exception:  # noqa: BLE001 - a user's kernel may refuse float64 CPU times
        return True


def model_inside(obj: Any) -> Optional[Model]:
    """The :class:`Model` that ``obj`` is or wraps (torch.compile's module, DataParallel's, DistributedDataParallel's
    or train_ddp's DDPModel's ``.module``); None for anything else."""
    for inner in (obj, getattr(obj, "_orig_mod", None), getattr(obj, "module", None)):
        if isinstance(inner, Model):
            return inner
    return None


def as_model(score: Any, sde: SDE) -> Model:
    """Turn whatever the caller passed as a model into a :class:`Model` under ``sde``.

    Accepted: a :class:`Model` (a :class:`ScoreModel`, say) built for the same SDE; an object with ``as_model(sde)``
    (guidance combinators); an object with ``score_fn(sde)`` (an oracle such as
    :class:`sdegen.analytic.GaussianMixture`, whose exact score depends on the SDE); or a plain callable
    ``score(x, t)`` with t of shape (B,), taken as the score.
    """
    if not isinstance(sde, SDE):
        raise TypeError(f"sde must be an sdegen.SDE instance (e.g. sdegen.VPSDE()); got {sde!r}.")
    if isinstance(score, Model):
        if not _same_sde(score.sde, sde):
            raise ValueError(f"sde: the model was built for {score.sde!r} but is used under sde={sde!r}; build the "
                             "model with the SDE it is sampled with.")
        return score
    if hasattr(score, "as_model"):
        return score.as_model(sde)
    if hasattr(score, "score_fn"):
        return ScoreModel(score.score_fn(sde), sde, prediction="score")
    torch_wrapper = isinstance(score, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) or \
        hasattr(score, "_orig_mod")
    wrapped = model_inside(score) if torch_wrapper else None
    if wrapped is not None:
        # taken for a plain score network, it would run the model's conversions in the wrapper's parameter dtype,
        # not the state's: the model inside is used, and the wrapper's work (compilation, replicas) is not
        warnings.warn(f"the model is a {type(score).__name__} around a {type(wrapped).__name__}: sdegen uses the "
                      f"{type(wrapped).__name__} inside, without the wrapper; wrap the network inside the model to "
                      "keep it (ScoreModel(torch.compile(net), ...), ScoreModel(nn.DataParallel(net), ...)).",
                      UserWarning, stacklevel=3)
        return as_model(wrapped, sde)
    if callable(score):
        return ScoreModel(score, sde, prediction="score")
    raise TypeError(f"the model must be an sdegen.Model, a callable score(x, t) or an object with score_fn(sde); "
                    f"got {type(score).__name__}.")


def resolve_score(score: Any, sde: SDE) -> Callable:
    """``as_model(score, sde).score``: the score as a plain callable ``score(x, t)``."""
    return as_model(score, sde).score
