"""Self-generated maps: the picture of an image that the ReDi recover network sees instead of it.

The default map is the rendered HOG picture (paper: 9 orientation bins, 8x8-pixel cells), exactly
as ``skimage.feature.hog(..., visualize=True, channel_axis=-1)`` draws it for the ``uint8`` image.
Sobel, Roberts and Canny(50, 100) edge maps are the ablation alternatives (paper Table 5).
``build_selfmap(cfg)`` looks ``cfg.kind`` up in ``SELFMAP_REGISTRY`` (``selfmap_names()`` lists it).
Every module maps ``(B, 3, H, W)`` float RGB in ``[0, 1]`` to ``(B, 1, H, W)`` float in ``[0, 1]``.

How the HOG picture is made (skimage 0.26, ``skimage/feature/_hog.py`` and ``_hoghistogram.pyx``):

1. Gradients per channel on the ``uint8`` values (as float, 0-255 units): central differences
   ``g[i] = v[i+1] - v[i-1]`` along rows and columns, 0 on the first and last row / column.
2. Per pixel, the channel with the largest gradient magnitude is used (first channel on ties).
3. Orientation ``rad2deg(arctan2(g_row, g_col)) % 180`` (unsigned); bin ``i`` holds
   ``[i * 180/n, (i+1) * 180/n)``. A cell's histogram value is the *mean* gradient magnitude over
   the cell's ``cell x cell`` pixels that fall into the bin. Cells cover ``floor(H / cell)`` rows
   and ``floor(W / cell)`` columns; remainder pixels belong to no cell.
4. Rendering: for every cell and bin a line (``skimage.draw.line``) through the cell centre,
   perpendicular to the bin's mid-angle, radius ``cell // 2 - 1``, is added (``+=``) with the
   bin's value. The picture does not depend on block normalisation (it is drawn from the raw cell
   histograms), so the reference uses ``cells_per_block=(1, 1)``; pixels outside the cells are 0.

Intensity scaling (open in the paper; chosen here): ``model.selfmap.scale``.

- ``line`` (the default): one fixed scale per product line, the ``scale_percentile`` (99.5) of
  the raw map's pixels over the prompt bank's images, fitted once at training
  (:func:`fit_selfmap_scale`) and stored in the artifact as the module's ``scale`` buffer; maps
  are ``clamp(raw / scale, 0, 1)``. A defect's strong gradient then saturates only its own pixels.
- ``image``: every map divided by its own maximum, ``map / (max(map) + 1e-6)``. A defect's strong
  gradient is often that maximum, so it dims the whole picture of its image (measured on a
  texture: an 8x10-pixel patch scaled every normal region by 0.66) and the recover net recovers
  normal regions wrongly exactly on defective images. Kept for older artifacts and comparison.

Either way the map lies in ``[0, 1]`` and a flat image gives an all-zero map; Sobel and Roberts
scale the same way. :func:`hog_image_skimage` (the reference) is scaled per image.

``TorchHOG`` reproduces steps 1-4 batched in PyTorch (CPU or CUDA): the input is clamped to
[0, 1] and rounded to the ``uint8`` levels (``round(x * 255)``), so gradients are the same integers
that skimage sees; channels are compared on exact integer squared magnitudes; orientations are
binned through a 511 x 511 table over all integer gradient pairs, computed once with skimage's own
numpy arithmetic; cell histograms are a ``scatter_add`` (CPU) or one-hot average pooling (CUDA,
deterministic); the picture is a stride-``cell`` transposed convolution (written as one matmul)
of the histograms with fixed stencils rasterised by ``skimage.draw.line``. skimage's float
rounding of ``centre -/+ d`` makes the drawn lines depend on the cell position for some cell
sizes (e.g. 7), so one stencil per distinct endpoint pattern is used. What remains is float32
summation order (skimage sums a cell in float32 too, but draws in float64): the measured max abs
difference after scaling is below 3e-7 on natural and random images (tests bound it by 1e-5).

Edge maps (all on the grey image ``0.299 R + 0.587 G + 0.114 B``, OpenCV's weights):

- ``SobelMap``: 3x3 Sobel kernels, reflect-101 border (OpenCV's default), magnitude
  ``sqrt(gx^2 + gy^2)``, per-image max scaling.
- ``RobertsMap``: 2x2 Roberts cross kernels, replicated last row / column, magnitude
  ``sqrt(g1^2 + g2^2)``, per-image max scaling.
- ``CannyMap``: ``skimage.feature.canny`` per image on the ``uint8`` grey image with
  ``low_threshold=50, high_threshold=100`` (0-255 gradient units, like OpenCV ``Canny(50, 100)``)
  and ``sigma=0`` (no Gaussian smoothing, as OpenCV's Canny does none). It differs from OpenCV in
  using the L2 gradient norm (OpenCV's default is L1) and bilinear non-maximum suppression.
  The output is binary {0, 1}; it runs on the CPU with numpy (hysteresis is sequential).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from redi.core.errors import ConfigError, InputError, WeightsError
from redi.core.name_registry import Registry

if TYPE_CHECKING:  # only for annotations: redi.core.config may import this module without a cycle
    from redi.core.config import SelfMapConfig

# kind -> builder(SelfMapConfig) -> module; the one list of self-map kinds
SELFMAP_REGISTRY: Registry[Callable[["SelfMapConfig"], nn.Module]] = Registry("self-map kind", "model.selfmap.kind")

EPS = 1e-6  # added to the per-image maximum so that flat images map to 0 instead of NaN
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as OpenCV's cvtColor(RGB2GRAY)


def _scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Divide each map of a (B, 1, H, W) batch by its own maximum (+ EPS)."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(0.0).view(-1, 1, 1, 1)
    return maps / (peak + EPS)


class ScaledMap(nn.Module):
    """A self-map whose raw picture (``raw(x)``) is scaled per line or per image.

    ``scale`` is a persistent buffer, so the fitted line scale travels in the detector's state
    dict; NaN means "not fitted", and a line-scaled map refuses to run until it is.
    """

    def __init__(self, mode: str = "line") -> None:
        super().__init__()
        if mode not in ("line", "image"):
            raise ConfigError(f"model.selfmap.scale must be 'line' or 'image'; got {mode!r}")
        self.mode = mode
        self.register_buffer("scale", torch.tensor(float("nan")))

    def raw(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def set_scale(self, value: float) -> None:
        """Fix the line's scale (from :func:`fit_selfmap_scale`)."""
        if not value > 0:
            raise ConfigError(f"a self-map scale must be > 0; got {value} (are all bank images flat?)")
        self.scale.fill_(float(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) in [0, 1]."""
        maps = self.raw(x)
        if self.mode == "image":
            return _scale_to_unit(maps)
        if torch.isnan(self.scale):
            raise WeightsError("the line's self-map scale is not fitted; fit it on the bank images with "
                               "redi.core.selfmaps.fit_selfmap_scale (the training stages do) or set "
                               "model.selfmap.scale=image")
        return (maps / self.scale.to(maps.dtype)).clamp_(0.0, 1.0)


@torch.no_grad()
def fit_selfmap_scale(selfmap: nn.Module, images: torch.Tensor, percentile: float, batch_size: int = 16,
                      max_pixels: int = 8_000_000) -> float:
    """The line's self-map scale: ``percentile`` of the raw maps' pixels over ``images``.

    Sets it on ``selfmap`` and returns it. Pixels are taken with a fixed stride when there are
    more than ``max_pixels`` (deterministic, and a percentile of 8 M pixels is exact enough).
    Modules without a scale (Canny's binary edges) are left alone and give 1.0.
    """
    if not isinstance(selfmap, ScaledMap):
        return 1.0
    device = selfmap.scale.device
    parts = [selfmap.raw(images[i:i + batch_size].to(device)).flatten().cpu()
             for i in range(0, images.shape[0], batch_size)]
    pixels = torch.cat(parts) if parts else torch.zeros(1)
    if pixels.numel() > max_pixels:
        pixels = pixels[::-(-pixels.numel() // max_pixels)]
    value = float(np.percentile(pixels.numpy(), percentile))
    if not value > 0:  # sparse maps (large cells): fall back to the largest value
        value = float(pixels.max())
    selfmap.set_scale(value)
    return value


def _check_images(x: torch.Tensor) -> None:
    """Raise InputError unless x is a (B, 1 or 3, H, W) floating tensor."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or not torch.is_floating_point(x):
        raise InputError(
            f"self-map input must be a float tensor (B, 3, H, W) in [0, 1]; got dtype {x.dtype} "
            f"shape {tuple(x.shape)}. Convert images with redi.core.images / ImageDataset first."
        )


def _check_hog_params(orientations: int, cell: int) -> None:
    if orientations < 1:
        raise ConfigError(f"model.selfmap.hog_orientations must be >= 1; got {orientations}")
    if cell < 2:
        raise ConfigError(f"model.selfmap.hog_cell must be >= 2 pixels; got {cell}")


def hog_image_skimage(rgb_uint8: np.ndarray, orientations: int = 9, cell: int = 8) -> np.ndarray:
    """Reference HOG picture: skimage's rendered ``hog_image``, scaled by its maximum.

    ``rgb_uint8`` is (H, W, 3) or (H, W) ``uint8``. Returns float32 (H, W) in [0, 1].
    """
    _check_hog_params(orientations, cell)
    from skimage.feature import hog

    image = np.asarray(rgb_uint8)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise InputError(f"hog_image_skimage needs a uint8 (H, W[, 3]) image; got {image.dtype} {image.shape}")
    if image.shape[0] < cell or image.shape[1] < cell:
        raise InputError(f"image {image.shape[:2]} is smaller than one {cell}x{cell} HOG cell")
    _, picture = hog(
        image,
        orientations=orientations,
        pixels_per_cell=(cell, cell),
        cells_per_block=(1, 1),  # the picture ignores block normalisation; 1x1 is the cheapest
        visualize=True,
        channel_axis=-1 if image.ndim == 3 else None,
    )
    picture = np.maximum(picture, 0.0)
    return (picture / (picture.max() + EPS)).astype(np.float32)


def _line_offsets(orientations: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """skimage's per-orientation line half-extents (dr, dc), computed with its exact arithmetic."""
    radius = cell // 2 - 1
    mid_angles = np.pi * (np.arange(orientations) + 0.5) / orientations
    return radius * np.sin(mid_angles), radius * np.cos(mid_angles)


def _axis_endpoint_classes(n_cells: int, cell: int, deltas: np.ndarray, sign: int) -> list[tuple]:
    """Per cell index along one axis: the line endpoint offsets from the cell corner.

    skimage truncates ``int(centre - sign * d)`` and ``int(centre + sign * d)`` with float
    ``centre``; rounding of ``centre -/+ d`` makes the offsets depend on the cell position when
    ``d`` is close to an integer (e.g. cell 7), so they are computed per position.
    """
    classes = []
    for k in range(n_cells):
        corner = k * cell
        centre = corner + cell // 2
        start = tuple(int(centre - sign * d) - corner for d in deltas)
        stop = tuple(int(centre + sign * d) - corner for d in deltas)
        classes.append((start, stop))
    return classes


def hog_stencil(orientations: int, cell: int, row_ends: tuple, col_ends: tuple) -> torch.Tensor:
    """(orientations, 1, cell, cell) float32 masks of the lines skimage draws in one cell.

    ``row_ends`` / ``col_ends`` are the (start, stop) endpoint offsets per orientation from the
    cell's corner (see :func:`_axis_endpoint_classes`); lines are rasterised by
    ``skimage.draw.line`` so the picture matches skimage pixel for pixel.
    """
    from skimage.draw import line

    stencil = np.zeros((orientations, 1, cell, cell), dtype=np.float32)
    for o in range(orientations):
        rr, cc = line(row_ends[0][o], col_ends[0][o], row_ends[1][o], col_ends[1][o])
        if rr.min() < 0 or cc.min() < 0 or rr.max() >= cell or cc.max() >= cell:
            raise ConfigError(f"HOG cell {cell} is too small to draw orientation lines inside it; use >= 2")
        # Assignment, not +=: numpy's fancy-index += in skimage adds once per distinct pixel too.
        stencil[o, 0, rr, cc] = 1.0
    return torch.from_numpy(stencil)


def _central_gradients(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """skimage's _hog_channel_gradient on (B, C, H, W): v[i+1] - v[i-1], 0 on the border."""
    g_row = torch.empty_like(v)
    g_col = torch.empty_like(v)
    # Writing into slices of empty tensors and zeroing only the borders avoids two full copies.
    torch.sub(v[:, :, 2:, :], v[:, :, :-2, :], out=g_row[:, :, 1:-1, :])
    torch.sub(v[:, :, :, 2:], v[:, :, :, :-2], out=g_col[:, :, :, 1:-1])
    for border in (0, -1):
        g_row[:, :, border, :].zero_()
        g_col[:, :, :, border].zero_()
    return g_row, g_col


def orientation_bin_table(orientations: int) -> np.ndarray:
    """(511 * 511,) orientation bin (uint8 for < 255 bins: a small table stays in cache) of every integer gradient (g_row, g_col) in [-255, 255].

    Index ``(g_row + 255) * 511 + (g_col + 255)``. Computed with skimage's own numpy arithmetic
    (``rad2deg(arctan2) % 180`` against ``180. / n * i`` edges in float64), so binning is
    bit-identical to skimage's. Angles in no bin (float rounding at 180) get ``orientations``.
    """
    grid = np.arange(-255, 256, dtype=np.float64)
    g_row, g_col = np.meshgrid(grid, grid, indexing="ij")
    angle = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    table = np.full(angle.shape, orientations, dtype=np.uint8 if orientations < 255 else np.int64)
    width = 180.0 / orientations
    for i in range(orientations):
        table[(angle >= width * i) & (angle < width * (i + 1))] = i
    return table.ravel()


class TorchHOG(ScaledMap):
    """Batched rendered-HOG picture, pixel-for-pixel like :func:`hog_image_skimage`.

    ``forward((B, 3, H, W) float in [0, 1]) -> (B, 1, H, W)`` in [0, 1]. The input is clamped to
    [0, 1] and rounded to the 256 uint8 levels first, so gradients are the integers skimage sees
    on the uint8 image; a (B, 1, H, W) grey batch is handled like skimage's grey images.
    """

    LUT_SIDE = 511  # integer gradients lie in [-255, 255]
    CPU_CHUNK = 2  # images per step on the CPU: keeps the working set in L2 (measured ~1.7x faster than 8)

    def __init__(self, orientations: int = 9, cell: int = 8, scale: str = "image") -> None:
        super().__init__(scale)
        _check_hog_params(orientations, cell)
        self.orientations = orientations
        self.cell = cell
        self.register_buffer("bin_table", torch.from_numpy(orientation_bin_table(orientations)), persistent=False)
        self._plans: dict[tuple, list[tuple[torch.Tensor | None, torch.Tensor]]] = {}
        self._cell_ids: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"orientations={self.orientations}, cell={self.cell}"

    def _dominant_gradient(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table index, magnitude), each (B, 1, H, W), of the channel with the largest gradient."""
        v = x.float().mul(255.0).round_().clamp_(0.0, 255.0)
        g_row, g_col = _central_gradients(v)
        channels = v.shape[1]
        # key = 4 * |g|^2 + priority: exact integers in float32 (< 2^24), so the max over channels
        # picks the largest magnitude and, on ties, the first channel, like np.argmax(np.hypot).
        priority = torch.arange(channels, 0, -1, dtype=v.dtype, device=v.device).view(1, -1, 1, 1)
        key = (g_row * g_row).addcmul_(g_col, g_col).mul_(4.0).add_(priority)
        best = key[:, :1]
        for ch in range(1, channels):
            best = torch.maximum(best, key[:, ch:ch + 1])
        mag2 = best.mul(0.25).floor_()
        channel = best.sub(mag2, alpha=4.0).neg_().add_(float(channels)).long()
        code = g_row.mul_(self.LUT_SIDE).add_(g_col)  # g_row is not needed any more
        index = code.gather(1, channel).add_(255 * self.LUT_SIDE + 255).long()
        return index, mag2.sqrt_()

    def _cell_index(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(H * W,) cell number of every pixel; pixels outside the cells go to slot n_cells."""
        key = (height, width, str(device))
        if key not in self._cell_ids:
            n_r, n_c = height // self.cell, width // self.cell
            rows = torch.arange(height) // self.cell
            cols = torch.arange(width) // self.cell
            ids = rows.view(-1, 1) * n_c + cols.view(1, -1)
            outside = (rows.view(-1, 1) >= n_r) | (cols.view(1, -1) >= n_c)
            self._cell_ids[key] = ids.masked_fill(outside, n_r * n_c).flatten().to(device)
        return self._cell_ids[key]

    def histograms(self, x: torch.Tensor, pooled: bool | None = None) -> torch.Tensor:
        """(B, orientations, H // cell, W // cell) cell histograms (mean magnitude per bin).

        ``pooled`` picks the accumulation: a scatter_add (default on the CPU: deterministic there
        and no (B, n, H, W) one-hot tensor) or one-hot votes + average pooling (default on CUDA,
        where scatter_add's float atomics would make results vary from run to run).
        """
        batch, _, height, width = x.shape
        n_r, n_c = height // self.cell, width // self.cell
        index, magnitude = self._dominant_gradient(x)
        bins = self.bin_table.take(index).long()  # (B, 1, H, W), values 0..n (n: in no bin)
        if pooled is None:
            pooled = x.device.type != "cpu"
        if pooled:
            bins = bins[:, :, :n_r * self.cell, :n_c * self.cell]
            ids = torch.arange(self.orientations, device=x.device).view(1, -1, 1, 1)
            votes = (bins == ids) * magnitude[:, :, :n_r * self.cell, :n_c * self.cell]
            return F.avg_pool2d(votes, self.cell)
        slots = n_r * n_c + 1  # one spare slot per bin for pixels outside the cells
        target = bins.view(batch, -1).mul_(slots).add_(self._cell_index(height, width, x.device))
        hist = torch.zeros(batch, (self.orientations + 1) * slots, device=x.device)
        hist.scatter_add_(1, target, magnitude.view(batch, -1))
        hist = hist.view(batch, self.orientations + 1, slots)[:, :self.orientations, :-1]
        return hist.reshape(batch, self.orientations, n_r, n_c) / float(self.cell * self.cell)

    def _render_plan(self, n_r: int, n_c: int, device: torch.device) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """(cell mask or None, stencil) pairs that together draw every cell like skimage does."""
        key = (n_r, n_c, str(device))
        if key not in self._plans:
            dr, dc = _line_offsets(self.orientations, self.cell)
            rows = _axis_endpoint_classes(n_r, self.cell, dc, sign=1)
            cols = _axis_endpoint_classes(n_c, self.cell, dr, sign=-1)
            plan = []
            for row_class in sorted(set(rows)):
                row_mask = torch.tensor([r == row_class for r in rows], dtype=torch.float32)
                for col_class in sorted(set(cols)):
                    col_mask = torch.tensor([c == col_class for c in cols], dtype=torch.float32)
                    mask = (row_mask.view(-1, 1) * col_mask.view(1, -1)).view(1, 1, n_r, n_c)
                    stencil = hog_stencil(self.orientations, self.cell, row_class, col_class).to(device)
                    plan.append((mask.to(device), stencil))
            if len(plan) == 1:  # the usual case (e.g. 8 px cells): one stencil for every cell
                plan = [(None, plan[0][1])]
            self._plans[key] = plan
        return self._plans[key]

    def _draw(self, hist: torch.Tensor, stencil: torch.Tensor) -> torch.Tensor:
        """Transposed convolution with stride = kernel = cell, written as one matmul (no overlap)."""
        batch, n, n_r, n_c = hist.shape
        tiles = hist.permute(0, 2, 3, 1).reshape(-1, n) @ stencil.view(n, -1)  # (B*n_r*n_c, cell^2)
        tiles = tiles.view(batch, n_r, n_c, self.cell, self.cell).permute(0, 1, 3, 2, 4)
        return tiles.reshape(batch, 1, n_r * self.cell, n_c * self.cell)

    def render(self, hist: torch.Tensor) -> torch.Tensor:
        """Draw (B, n, n_r, n_c) cell histograms as the (B, 1, n_r * cell, n_c * cell) picture."""
        picture = None
        for mask, stencil in self._render_plan(hist.shape[2], hist.shape[3], hist.device):
            part = self._draw(hist if mask is None else hist * mask, stencil)
            picture = part if picture is None else picture + part
        return picture

    @torch.no_grad()  # rounding to uint8 levels has no useful gradient; the map is an input
    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled HOG picture of a (B, 3, H, W) batch in [0, 1]: (B, 1, H, W), gradient units."""
        _check_images(x)
        height, width = x.shape[2:]
        if height < self.cell or width < self.cell:
            raise InputError(f"images {height}x{width} are smaller than one {self.cell}x{self.cell} HOG cell")
        if x.device.type == "cpu" and x.shape[0] > self.CPU_CHUNK:
            return torch.cat([self._picture(part) for part in x.split(self.CPU_CHUNK)])
        return self._picture(x)

    def _picture(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        picture = self.render(self.histograms(x))
        if picture.shape[2:] != (height, width):
            # Remainder rows / columns outside the cells stay 0, as in skimage.
            picture = F.pad(picture, (0, width - picture.shape[3], 0, height - picture.shape[2]))
        return picture


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of a (B, 3 or 1, H, W) batch."""
    if x.shape[1] == 1:
        return x.float()
    weights = torch.tensor(GREY_WEIGHTS, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x.float() * weights).sum(dim=1, keepdim=True)


class SobelMap(ScaledMap):
    """Sobel gradient magnitude of the grey image, scaled to [0, 1] per line or per image."""

    def __init__(self, scale: str = "image") -> None:
        super().__init__(scale)
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernels", torch.stack([gx, gx.t()]).unsqueeze(1), persistent=False)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unscaled (B, 1, H, W) magnitude."""
        _check_images(x)
        grey = F.pad(_grey(x), (1, 1, 1, 1), mode="reflect")  # reflect = OpenCV's BORDER_REFLECT_101
        g = F.conv2d(grey, self.kernels)
        return g.pow(2).sum(dim=1, keepdim=True).sqrt()


class RobertsMap(ScaledMap):
    """Roberts cross gradient magnitude of the grey image, scaled to [0, 1] per line or per image."""

    def __init__(self, scale: str = "image") -> None:
        super().__init__(scale)
        g1 = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
        g2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
        self.register_buffer("kernels", torch.stack([g1, g2]).unsqueeze(1), persistent=False)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unscaled (B, 1, H, W) magnitude."""
        _check_images(x)
        grey = F.pad(_grey(x), (0, 1, 0, 1), mode="replicate")
        g = F.conv2d(grey, self.kernels)
        return g.pow(2).sum(dim=1, keepdim=True).sqrt()


class CannyMap(nn.Module):
    """Binary Canny edges like OpenCV ``Canny(low, high)`` on the 0-255 grey image.

    Runs ``skimage.feature.canny(grey_uint8, sigma=0, low_threshold=low, high_threshold=high)``
    per image on the CPU (hysteresis is sequential) and returns the edges on x's device.
    """

    def __init__(self, low: float = 50.0, high: float = 100.0) -> None:
        super().__init__()
        if not 0.0 <= low <= high:
            raise ConfigError(
                f"model.selfmap.canny_low ({low}) must be >= 0 and <= model.selfmap.canny_high ({high})"
            )
        self.low = float(low)
        self.high = float(high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) edges in {0, 1}."""
        from skimage.feature import canny

        _check_images(x)
        grey = (_grey(x.detach()) * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        # uint8 input: skimage divides the thresholds by 255 and scales the image to [0, 1], so
        # the thresholds act in 0-255 gradient units as in OpenCV.
        edges = np.stack([
            canny(image[0], sigma=0.0, low_threshold=self.low, high_threshold=self.high)
            for image in grey
        ])
        return torch.from_numpy(edges.astype(np.float32)).unsqueeze(1).to(x.device)


@SELFMAP_REGISTRY.register("hog")
def _build_hog(cfg: SelfMapConfig) -> nn.Module:
    return TorchHOG(orientations=int(cfg.hog_orientations), cell=int(cfg.hog_cell), scale=cfg.scale)


@SELFMAP_REGISTRY.register("sobel")
def _build_sobel(cfg: SelfMapConfig) -> nn.Module:
    return SobelMap(scale=cfg.scale)


@SELFMAP_REGISTRY.register("roberts")
def _build_roberts(cfg: SelfMapConfig) -> nn.Module:
    return RobertsMap(scale=cfg.scale)


@SELFMAP_REGISTRY.register("canny")
def _build_canny(cfg: SelfMapConfig) -> nn.Module:
    return CannyMap(low=cfg.canny_low, high=cfg.canny_high)


def selfmap_names() -> tuple[str, ...]:
    """The self-map kinds :func:`build_selfmap` knows (the registry's, in registration order)."""
    return SELFMAP_REGISTRY.names()


def build_selfmap(cfg: SelfMapConfig) -> nn.Module:
    """The self-map module named by ``cfg.kind`` (one of :func:`selfmap_names`).

    Raises:
        ConfigError: the kind is unknown (the message lists the known ones).
    """
    return SELFMAP_REGISTRY.get(cfg.kind)(cfg)
