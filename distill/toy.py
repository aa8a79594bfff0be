"""A 2-D toy world for checking the DMD machinery on CPU in seconds (tests/test_dmd_toy.py).

Data: a Gaussian mixture p0 = sum_k pi_k N(mu_k, sig_k^2 I) in R^D. Under the project's flow convention
x_s = (1 - s) x0 + s eps (inference/flow.py) every noised marginal is again a mixture,

    p_s = sum_k pi_k N((1 - s) mu_k, ((1 - s)^2 sig_k^2 + s^2) I),

so the posterior mean E[x0 | x_s] (responsibility-weighted per-component posterior means) and the velocity
v = (x_s - E[x0 | x_s]) / s are exact: `ExactFlowModel` is a perfect teacher (real score). `ToyMLP` is a small
learnable network. Both have the DiT call signature `net(x [B, D], t [B] = 1000 s, context, clip_fea=None, y=None)
-> v [B, D]` so they plug into `distill.losses` and `inference.sampling` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class GaussianMixture:
    """p0 = sum_k pi_k N(mu_k, sig_k^2 I): means [K, D], stds [K], weights [K] (normalised here)."""

    def __init__(self, means: Sequence[Sequence[float]] | Tensor, stds: Sequence[float] | Tensor,
                 weights: Sequence[float] | Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        w = torch.as_tensor(weights, dtype=torch.float64)
        if self.means.ndim != 2 or self.stds.shape != w.shape or w.shape != self.means.shape[:1]:
            raise ValueError("means [K, D], stds [K] and weights [K] must agree")
        if (self.stds <= 0).any() or (w <= 0).any():
            raise ValueError("stds and weights must be positive")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def ring(cls, weights: Sequence[float], stds: Sequence[float], radius: float = 2.0,
             phase: float = 0.0) -> GaussianMixture:
        """K modes evenly spaced on a circle of `radius` in 2-D."""
        k = len(weights)
        ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k) + phase
        return cls(radius * torch.stack([ang.cos(), ang.sin()], 1), stds, weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples [n, D] float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * eps).float()

    def log_prob(self, x_s: Tensor, s: Tensor | float) -> Tensor:
        """log p_s(x_s) [B] of the noised marginal at sigma s (float or [B]), float64."""
        x = x_s.double()
        s = torch.as_tensor(s, dtype=torch.float64).expand(x.shape[0])[:, None]  # [B, 1]
        a = 1.0 - s
        var = a * a * (self.stds**2)[None] + s * s  # [B, K]
        d2 = (x[:, None, :] - a[:, :, None] * self.means[None]).pow(2).sum(-1)  # [B, K]
        logn = -0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(self.weights.log()[None] + logn, dim=1)

    def posterior_mean(self, x_s: Tensor, s: Tensor | float) -> Tensor:
        """E[x0 | x_s] for x_s [B, D] at sigma s (float or [B]); computed in float64, returned as x_s.dtype."""
        x = x_s.double()
        s = torch.as_tensor(s, dtype=torch.float64).expand(x.shape[0])[:, None, None]  # [B, 1, 1]
        a = 1.0 - s
        mu, var0 = self.means[None], (self.stds**2)[None, :, None]  # [1, K, D], [1, K, 1]
        var = a * a * var0 + s * s  # [B, K, 1]
        diff = x[:, None, :] - a * mu  # [B, K, D]
        logr = (self.weights.log()[None, :, None] - 0.5 * diff.pow(2).sum(-1, keepdim=True) / var
                - 0.5 * self.dim * var.log())
        r = torch.softmax(logr, dim=1)  # [B, K, 1]
        post = mu + (a * var0 / var) * diff  # per-component E[x0 | x_s, k]
        return (r * post).sum(1).to(x_s.dtype)

    def velocity(self, x_s: Tensor, s: Tensor | float) -> Tensor:
        """Exact v = (x_s - E[x0 | x_s]) / s (s > 0)."""
        s_ = torch.as_tensor(s, dtype=torch.float64).expand(x_s.shape[0])[:, None]
        return ((x_s.double() - self.posterior_mean(x_s, s).double()) / s_).to(x_s.dtype)

    def coverage(self, x: Tensor, radius: float = 3.0) -> tuple[float, Tensor]:
        """Mode coverage of samples x [n, D]: (fraction within `radius` stds of some mode, share_k / pi_k [K]).

        Each near sample is assigned to its nearest mode in units of that mode's std; share_k is the fraction
        of ALL samples assigned to mode k, so a distribution matching p0 gives ratios ~1 and a dropped mode 0.
        Non-finite samples count as far.
        """
        d = (x.double()[:, None, :] - self.means[None]).norm(dim=-1) / self.stds[None]  # [n, K]
        d = torch.nan_to_num(d, nan=math.inf)
        dmin, k = d.min(dim=1)
        near = dmin <= radius
        counts = torch.bincount(k[near], minlength=len(self.weights)).double()
        return float(near.double().mean()), counts / x.shape[0] / self.weights

    def covers_all_modes(self, x: Tensor, radius: float = 3.0, min_near: float = 0.95,
                         min_share: float = 0.5) -> bool:
        near, ratio = self.coverage(x, radius)
        return near >= min_near and bool((ratio >= min_share).all())


class ExactFlowModel(nn.Module):
    """The exact flow model of a `GaussianMixture` with the DiT signature: v(x, t = 1000 s). No parameters."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, clip_fea: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        return self.mixture.velocity(x.float(), t.double() / 1000.0)


class ToyMLP(nn.Module):
    """A small MLP v(x, t) with the DiT signature; the timestep enters as s = t / 1000 and Fourier features."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, n_freq: int = 4,
                 act: type[nn.Module] = nn.SiLU, x_scale: float = 1.0):
        super().__init__()
        self.x_scale = x_scale
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, clip_fea: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        s = (t.float() / 1000.0)[:, None]
        ang = s * self.freqs
        return self.net(torch.cat([self.x_scale * x.float(), s, ang.sin(), ang.cos()], dim=1))
