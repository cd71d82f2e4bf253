"""Small reference networks shared by examples, tests and benchmarks.

- :class:`MLP`: a residual MLP with a sinusoidal time embedding, for vectors (B, d) (or any (B, ...) it flattens);
- :class:`UNet`: a two-level U-Net for small images such as the 8x8 digits, (B, C, H, W) with H, W divisible by 4;
- :class:`ConvClassifier`: a small convolutional classifier, noise-conditional (takes t) or clean (t=None).

Score networks take ``(x, t, y=None)``: t is the (B,) network time input (see :class:`sdegen.ScoreModel`); with
``num_classes`` set they also take class labels y (B,), and y=None (or the label ``num_classes``) selects the
unconditional "null" label, so one network serves classifier-free guidance (Ho & Salimans 2022).
Every network records the keyword arguments that rebuild it in ``.config``; :func:`build_net` rebuilds it by name.

Mixed precision: a network converted with ``net.to(torch.bfloat16)`` (or float16) runs in the dtype of its
parameters whatever the input's floating dtype; inputs are cast on entry and outputs returned in the input's dtype
(so a float64 sampler state or a float64 classifier-guidance gradient passes through a 16-bit network).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ._validate import check_int, check_number, is_integer_dtype


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of scale * t (Vaswani et al. 2017; DDPM's time embedding): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = (scale * t.to(torch.float32))[:, None] * freqs[None]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


def _to_params(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """x cast to the dtype of ``layer``'s weight (a no-op when they agree): the mixed-precision entry."""
    return x.to(layer.weight.dtype) if x.is_floating_point() else x


class _Conditioning(nn.Module):
    """Time embedding (plus an optional learned class embedding with a null label) -> (B, emb_dim)."""

    def __init__(self, emb_dim: int, num_classes: Optional[int], time_scale: float):
        super().__init__()
        self.time_scale, self.num_classes, self.freq_dim = time_scale, num_classes, emb_dim // 2
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)

    def forward(self, t: torch.Tensor, y: Optional[torch.Tensor], batch: int, ref: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        # the sinusoids are computed in float32 (a 16-bit 1000 t would lose the phase) and enter the network in
        # the dtype of its parameters
        emb = self.mlp(timestep_embedding(t, self.freq_dim, self.time_scale).to(self.mlp[0].weight.dtype))
        if self.label is None:
            if y is not None:
                raise ValueError("this network has no class conditioning (num_classes=None) but got labels y.")
            return emb
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=ref.device)
        else:
            _check_labels(y, batch, self.num_classes)
        return emb + self.label(y.to(device=ref.device, dtype=torch.long))


def _check_common(num_classes: Optional[int], time_scale: float, dropout: float = 0.0) -> None:
    check_int(num_classes, "num_classes", lo=1, none_ok=True)
    check_number(time_scale, "time_scale", lo=0.0, lo_open=True)
    check_number(dropout, "dropout", lo=0.0, hi=1.0, hi_open=True)


def _check_labels(y: torch.Tensor, batch: int, num_classes: int) -> None:
    """Labels must be integers of shape (batch,) in [0, num_classes] (num_classes is the null label); their values
    are checked where that needs no device read (on the CPU)."""
    if not isinstance(y, torch.Tensor) or not is_integer_dtype(y.dtype):
        got = y.dtype if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"labels y must be an integer tensor of shape ({batch},); got {got}.")
    if y.shape != (batch,):
        raise ValueError(f"labels y must have shape ({batch},), one per example; got {tuple(y.shape)}.")
    if y.device.type == "cpu" and batch and bool(((y < 0) | (y > num_classes)).any()):
        raise ValueError(f"labels y must lie in [0, {num_classes}] ({num_classes} is the null label); got values "
                         f"from {int(y.min())} to {int(y.max())}.")


class MLP(nn.Module):
    """Residual MLP score network for vectors: (B, ...) -> same shape, input flattened to d values.

    Args:
        dim: values per example d.
        hidden: width; depth: residual blocks; num_classes: enables label conditioning (with a null label,
            ``.null_label`` = num_classes, which y=None selects);
        time_scale: the embedding sees time_scale * t (1000 suits t in [0, 1]).
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, num_classes: Optional[int] = None,
                 time_scale: float = 1000.0):
        super().__init__()
        check_int(dim, "dim", lo=1, hint=" (values per example)")
        check_int(hidden, "hidden", lo=2, hint=" (the width; the time embedding takes half of it)")
        check_int(depth, "depth", lo=0, hint=" (residual blocks)")
        _check_common(num_classes, time_scale)
        self.config = dict(dim=dim, hidden=hidden, depth=depth, num_classes=num_classes, time_scale=time_scale)
        self.null_label = num_classes  # the label of the unconditional branch (None: no class conditioning)
        self.cond = _Conditioning(hidden, num_classes, time_scale)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                          nn.Linear(hidden, hidden)) for _ in range(depth))
        self.emb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        dim = self.inp.in_features
        if x.ndim < 1 or x.shape[0] and x[0].numel() != dim:
            raise ValueError(f"MLP(dim={dim}) needs x of shape (B, ...) with {dim} values per example; got "
                             f"{tuple(x.shape)}.")
        B = x.shape[0]
        emb = self.cond(t, y, B, x)
        h = self.inp(_to_params(x, self.inp).reshape(B, -1))
        for block, proj in zip(self.blocks, self.emb_proj):
            h = h + block(h + proj(emb))
        return self.out(h).reshape(x.shape).to(x.dtype)


def _groups(ch: int) -> int:
    return math.gcd(ch, 8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning embedding added in between (DDPM's residual block)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(nn.functional.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """A small two-level U-Net score network for images (B, C, H, W), H and W divisible by 4
    (the architecture of Ho et al. 2020 cut down to two resolutions, no attention).

    Args:
        channels: image channels C; base: channels at full resolution (2 * base below);
        num_classes: enables label conditioning (with a null label, ``.null_label`` = num_classes) for
            classifier-free guidance;
        dropout: inside residual blocks; time_scale: see :class:`MLP`.
    """

    def __init__(self, channels: int = 1, base: int = 32, num_classes: Optional[int] = None, dropout: float = 0.0,
                 time_scale: float = 1000.0):
        super().__init__()
        check_int(channels, "channels", lo=1)
        check_int(base, "base", lo=1, hint=" (channels at full resolution)")
        _check_common(num_classes, time_scale, dropout)
        self.config = dict(channels=channels, base=base, num_classes=num_classes, dropout=dropout,
                           time_scale=time_scale)
        self.null_label = num_classes  # the label of the unconditional branch (None: no class conditioning)
        c1, c2, e = base, 2 * base, 4 * base
        self.cond = _Conditioning(e, num_classes, time_scale)
        self.inp = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1, self.pool1 = ResBlock(c1, c1, e, dropout), nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2, self.pool2 = ResBlock(c1, c2, e, dropout), nn.Conv2d(c2, c2, 3, stride=2, padding=1)
        self.mid1, self.mid2 = ResBlock(c2, c2, e, dropout), ResBlock(c2, c2, e, dropout)
        self.up2 = ResBlock(2 * c2, c2, e, dropout)
        self.up1 = ResBlock(c2 + c1, c1, e, dropout)
        self.out = nn.Sequential(nn.GroupNorm(_groups(c1), c1), nn.SiLU(), nn.Conv2d(c1, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"UNet needs x of shape (B, C, H, W) with H, W divisible by 4; got {tuple(x.shape)}.")
        emb = self.cond(t, y, x.shape[0], x)
        h1 = self.down1(self.inp(_to_params(x, self.inp)), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid2(self.mid1(self.pool2(h2), emb), emb)
        h = self.up2(torch.cat([nn.functional.interpolate(h, scale_factor=2.0), h2], 1), emb)
        h = self.up1(torch.cat([nn.functional.interpolate(h, scale_factor=2.0), h1], 1), emb)
        return self.out(h).to(x.dtype)


class ConvClassifier(nn.Module):
    """Convolutional classifier for small images: logits (B, num_classes) from x (B, C, H, W).

    With ``time_conditional=True`` it is the noise-conditional classifier p_t(y | x_t) of classifier guidance
    (Song et al. 2021, section 5 and appendix I.1; Dhariwal & Nichol 2021) and is called ``(x, t)`` with t (B,);
    otherwise it is a clean classifier called ``(x)``. :meth:`features` gives the pooled penultimate features.
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, base: int = 32, time_conditional: bool = True,
                 dropout: float = 0.0, time_scale: float = 1000.0):
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, base=base, time_conditional=time_conditional,
                           dropout=dropout, time_scale=time_scale)
        self.num_classes, self.time_conditional = num_classes, time_conditional
        e = 4 * base
        self.cond = _Conditioning(e, None, time_scale) if time_conditional else None
        self.inp = nn.Conv2d(channels, base, 3, padding=1)
        self.b1, self.pool = ResBlock(base, base, e, dropout), nn.Conv2d(base, 2 * base, 3, stride=2, padding=1)
        self.b2, self.b3 = ResBlock(2 * base, 2 * base, e, dropout), ResBlock(2 * base, 2 * base, e, dropout)
        self.norm = nn.GroupNorm(_groups(2 * base), 2 * base)
        self.head = nn.Linear(2 * base, num_classes)
        self.feature_dim = 2 * base

    def features(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Globally pooled penultimate features, (B, 2 * base), in x's dtype."""
        return self._features(x, t).to(x.dtype)

    def _features(self, x: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
        if self.time_conditional and t is None:
            raise ValueError("this classifier is noise-conditional: call it as classifier(x, t).")
        B, x = x.shape[0], _to_params(x, self.inp)
        emb = self.cond(t, None, B, x) if self.time_conditional else x.new_zeros(B, self.b1.emb.in_features)
        h = self.b1(self.inp(x), emb)
        h = self.b3(self.b2(self.pool(h), emb), emb)
        return nn.functional.silu(self.norm(h)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self._features(x, t)).to(x.dtype)


NETS: Dict[str, type] = {"MLP": MLP, "UNet": UNet, "ConvClassifier": ConvClassifier}


def build_net(name: str, config: Optional[dict] = None) -> nn.Module:
    """Rebuild a network from its class name and ``.config`` (what checkpoints store)."""
    if name not in NETS:
        raise ValueError(f"unknown network {name!r}; valid names are: {', '.join(sorted(NETS))}.")
    return NETS[name](**(config or {}))


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


__all__: Sequence[str] = ("MLP", "UNet", "ConvClassifier", "ResBlock", "timestep_embedding", "build_net", "NETS",
                          "count_parameters")
