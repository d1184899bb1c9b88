"""Sliding-window inference that streams along the last axis: memory for a slab, not for the whole output.

MONAI's ``sliding_window_inference`` allocates the blended output (C x the whole volume) and a count map
before the first window runs; on a 512x512x600 CT with a few classes that alone is several times the scan.
Its ``buffer_steps`` option only batches windows along an axis before writing into that same full output.
So this module does the blending itself, with MONAI's grid (``window_grid.grid_starts`` =
``dense_patch_slices``) and MONAI's window weights (``compute_importance_map``): windows are visited in
order of their start along the last axis; once every window starting at or before ``z`` has been added,
slices before the next start are final and are handed to ``emit`` (normalised: weighted sum / sum of
weights, as MONAI does) and dropped. The accumulator therefore spans one ROI depth, and the result equals
MONAI's whole-volume call up to floating-point summation order (tests/inference/test_streaming.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map

from medseg.inference.window_grid import grid_starts, roi_padding

EMIT_SLAB = 4  # slices handed to ``emit`` at a time
Emit = Callable[[int, torch.Tensor], None]  # (first slice index along the last axis, logits (C, *spatial[:-1], n))


@torch.inference_mode()
def streaming_sliding_window(
    image: torch.Tensor,
    roi: Sequence[int],
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor, list[list[slice]]], torch.Tensor],
    num_classes: int,
    emit: Emit,
    *,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_device: torch.device | str = "cpu",
    acc_dtype: torch.dtype = torch.float32,
) -> None:
    """Blend windows of ``image`` (channels first, no batch axis; any dtype, kept on the CPU) slab by slab.

    ``predictor(windows, coords)`` gets a (B, C_in, *roi) batch on ``sw_device`` and MONAI-style window
    coordinates (``with_coord=True``), returns (B, num_classes, *roi) logits. ``emit(z0, logits)`` receives
    final, normalised logits for slices ``z0 .. z0 + n`` of the unpadded image in increasing order, each
    slice exactly once. ``acc_dtype`` float16 halves the accumulator (sums then carry ~3 significant digits).
    """
    spatial = list(image.shape[1:])
    roi = [int(r) for r in roi]
    # Axes shorter than the ROI are padded symmetrically with zeros, as MONAI does (rare for large scans).
    pad = roi_padding(spatial, roi)
    pad_before = pad[::2][::-1]  # per axis, first axis first
    x = F.pad(image, pad) if any(pad) else image
    size = list(x.shape[1:])
    starts = grid_starts(size, roi, overlap)
    weight = compute_importance_map(tuple(roi), mode=mode, sigma_scale=sigma_scale, device="cpu", dtype=torch.float32)

    depth = roi[-1]
    acc = torch.zeros((num_classes, *size[:-1], depth), dtype=acc_dtype)
    wsum = torch.zeros((*size[:-1], depth), dtype=acc_dtype)
    inner = [slice(b, b + n) for b, n in zip(pad_before[:-1], spatial[:-1])]  # un-pad the in-plane axes on emit
    z_off, z_len = pad_before[-1], spatial[-1]

    def flush(base: int, n: int) -> None:
        lo, hi = max(base, z_off), min(base + n, z_off + z_len)  # padded slices along the last axis are dropped
        for z0 in range(lo, hi, EMIT_SLAB):  # a few slices at a time: the normalised copy stays small
            z1 = min(z0 + EMIT_SLAB, hi)
            part = (slice(None), *inner, slice(z0 - base, z1 - base))
            emit(z0 - z_off, acc[part].to(torch.float32, copy=True).div_(wsum[part[1:]]))

    base = starts[-1][0]
    for z in starts[-1]:
        shift = z - base
        if shift:  # slices [base, z) are final: emit them, then move the window of the accumulator
            flush(base, min(shift, depth))
            # Move the kept slices to the front in chunks no longer than the shift: source and destination of
            # a chunk never overlap, so no temporary copy of the accumulator is needed.
            for k in range(0, max(depth - shift, 0), shift):
                c = min(shift, depth - shift - k)
                acc[..., k : k + c] = acc[..., shift + k : shift + k + c]
                wsum[..., k : k + c] = wsum[..., shift + k : shift + k + c]
            acc[..., max(depth - shift, 0) :] = 0
            wsum[..., max(depth - shift, 0) :] = 0
            base = z
        windows = list(itertools.product(*starts[:-1]))
        for i in range(0, len(windows), sw_batch_size):
            group = windows[i : i + sw_batch_size]
            boxes = [[slice(s, s + r) for s, r in zip(w, roi[:-1])] + [slice(z, z + depth)] for w in group]
            batch = torch.stack([x[(slice(None), *b)] for b in boxes]).to(sw_device, non_blocking=True)
            coords = [[slice(0, 1), slice(None), *b] for b in boxes]
            out = predictor(batch, coords).to("cpu", torch.float32)
            for k, b in enumerate(boxes):
                plane = tuple(b[:-1])
                acc[(slice(None), *plane)] += weight * out[k]
                wsum[plane] += weight
    flush(base, depth)
