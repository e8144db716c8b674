"""ReDi's losses: L_Rec = L2 + lambda_M * MSGMS (Eq. 4) and L_Dis = L_D + lambda_S * L_S (Eq. 6-9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from redi.core.errors import ConfigError

# RIAD's constant for images in [0, 1].
GMS_C = 0.0026
# How L_S is scaled (docs/loss_balance.md): "width" = c/hw * ||g_X - g_Y||_F, "area" = ||.||_F / hw.
LS_NORMALISATIONS = ("width", "area")


def _prewitt_magnitude(grey: torch.Tensor) -> torch.Tensor:
    kernel_x = torch.tensor([[1.0, 0.0, -1.0]] * 3, device=grey.device, dtype=grey.dtype) / 3.0
    kernels = torch.stack([kernel_x, kernel_x.t()]).unsqueeze(1)
    grads = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return torch.sqrt(grads.pow(2).sum(dim=1, keepdim=True) + 1e-12)


def msgms_loss(x: torch.Tensor, y: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """Multi-scale gradient-magnitude-similarity loss of RIAD: mean over scales of mean(1 - GMS).

    Computed on the grey image (mean of RGB); scales are successive 2x average poolings.
    """
    x_grey, y_grey = x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
    total = x.new_zeros(())
    for scale in range(scales):
        if scale > 0:
            x_grey, y_grey = F.avg_pool2d(x_grey, 2), F.avg_pool2d(y_grey, 2)
        gx, gy = _prewitt_magnitude(x_grey), _prewitt_magnitude(y_grey)
        gms = (2 * gx * gy + GMS_C) / (gx.pow(2) + gy.pow(2) + GMS_C)
        total = total + (1 - gms).mean()
    return total / scales


def recover_loss(x: torch.Tensor, y: torch.Tensor, lambda_m: float = 1.0, scales: int = 4) -> torch.Tensor:
    """L_Rec(X, Y) = L2(X, Y) + lambda_M * L_MSGMS(X, Y)."""
    return F.mse_loss(y, x) + lambda_m * msgms_loss(x, y, scales)


def cosine_distance_loss(reference: list[torch.Tensor], recovered: list[torch.Tensor]) -> torch.Tensor:
    """L_D (Eq. 6): mean over levels of the mean per-position (1 - cosine) between F_X^i and F_Y^i."""
    losses = [(1 - F.cosine_similarity(fx, fy, dim=1)).mean() for fx, fy in zip(reference, recovered)]
    return torch.stack(losses).mean()


def _check_normalisation(normalisation: str) -> None:
    if normalisation not in LS_NORMALISATIONS:
        raise ConfigError(f"L_S normalisation must be one of {LS_NORMALISATIONS} (train.ls_normalisation), "
                          f"got {normalisation!r}")


def self_correlation_distance(fx: torch.Tensor, fy: torch.Tensor, normalisation: str = "area") -> torch.Tensor:
    """Per-sample self-correlation distance ||g_X - g_Y||_F for one level (Eq. 7-8), scaled.

    F is softmax-normalised over channels at each position and reshaped to A (c x hw); g = A^T A.
    Because ||A^T A - B^T B||_F^2 = ||A A^T||_F^2 + ||B B^T||_F^2 - 2 ||A B^T||_F^2, only c x c
    products are needed: O(c^2 hw) instead of O(c hw^2) time and no hw x hw memory (at stride 4
    on a 256 px input hw = 4096). The Gram products run in float64 because the identity subtracts
    nearly equal numbers when g_X is close to g_Y.

    ``normalisation``: "area" divides by hw (the RMS over the hw x hw entries), so levels of
    different resolution weigh alike. "width" multiplies by c as well (c/hw * ||.||_F): where the
    softmax is flat (every entry of g about 1/c) the area-scaled distance shrinks with c, and
    "width" evens that out between backbones. Real EfficientNet-Lite features have a peaked softmax
    (one channel dominates most positions), where the area-scaled distance is already of L_D's size
    and "width" makes it 14-60x L_D; docs/loss_balance.md has the measurements. The default is "area".
    """
    _check_normalisation(normalisation)
    batch, channels, height, width = fx.shape
    a = torch.softmax(fx.float(), dim=1).reshape(batch, channels, -1).double()
    b = torch.softmax(fy.float(), dim=1).reshape(batch, fy.shape[1], -1).double()
    aa = torch.bmm(a, a.transpose(1, 2)).pow(2).sum(dim=(1, 2))
    bb = torch.bmm(b, b.transpose(1, 2)).pow(2).sum(dim=(1, 2))
    ab = torch.bmm(a, b.transpose(1, 2)).pow(2).sum(dim=(1, 2))
    squared = (aa + bb - 2 * ab).clamp_min(1e-18)
    scale = (channels if normalisation == "width" else 1) / (height * width)
    return (squared.sqrt() * scale).to(fx.dtype if fx.dtype.is_floating_point else torch.float32)


def self_correlation_loss(reference: list[torch.Tensor], recovered: list[torch.Tensor],
                          normalisation: str = "area") -> torch.Tensor:
    """L_S (Eq. 8): mean over levels (and the batch) of the self-correlation distance."""
    _check_normalisation(normalisation)
    return torch.stack([self_correlation_distance(fx, fy, normalisation).mean().float()
                        for fx, fy in zip(reference, recovered)]).mean()


def discriminate_loss(reference: list[torch.Tensor], recovered: list[torch.Tensor], lambda_s: float = 1.0,
                      use_self_correlation: bool = True,
                      normalisation: str = "area") -> tuple[torch.Tensor, dict[str, float]]:
    """L_Dis = L_D + lambda_S * L_S; returns the loss and its parts for logging.

    Parts: ``l_d``; and, when L_S is computed, ``l_s`` and ``ls_over_ld`` (L_S / L_D, both
    unweighted: how much L_S weighs against L_D before lambda_S, the balance that
    ``normalisation`` sets; 0 when L_D is 0).
    """
    _check_normalisation(normalisation)  # also when L_S is off: a wrong setting fails at once
    loss_d = cosine_distance_loss(reference, recovered)
    parts = {"l_d": float(loss_d.detach())}
    if not use_self_correlation or lambda_s == 0:
        return loss_d, parts
    loss_s = self_correlation_loss(reference, recovered, normalisation)
    parts["l_s"] = float(loss_s.detach())
    parts["ls_over_ld"] = parts["l_s"] / parts["l_d"] if parts["l_d"] > 0 else 0.0
    return loss_d + lambda_s * loss_s, parts
