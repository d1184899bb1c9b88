"""Inference benchmark: medseg's predictor vs a plain MONAI sliding_window_inference call, same run.

    .venv/bin/python benchmarks/inference.py                      # 512x512x300, memory-bounded on 512x512x600
    .venv/bin/python benchmarks/inference.py --shape 128 128 60 --bounded-shape 128 128 120   # smoke size
    .venv/bin/python benchmarks/inference.py --skip-compare --skip-bounded --precision-shape 128 128 64  # precision only

A synthetic CT (air around an elliptic body with organs, int16 HU) is segmented by the same untrained
network (weights fixed by a seed, instance norm) with the same ROI and overlap:

- plain: windowed intensity of the whole volume -> ``monai.inferers.sliding_window_inference`` -> argmax,
  twice: as the call is usually written (MONAI's default ``sw_batch_size=1``: the reference of the issue's
  goal, which names batching windows among the ways to beat it) and with medseg's window batch
  (``--sw-batch``), which isolates what skipping and the leaner pipeline give on their own;
- medseg: ``Predictor.predict`` on the in-memory image (preprocessing, body crop, body-free windows skipped,
  inversion, argmax), once per ``inference.window_grid`` setting.

- nnU-Net v2's predictor (``predict_single_npy_array``: preprocessing, sliding window with Gaussian blending, export
  to labels) with the same network, as a second reference, in its own venv (``make bench-nnunet-env``; run by
  ``nnunet_reference.py``, skipped with a message when ``--nnunet-python`` is missing).

With ``window_grid=whole`` medseg keeps the plain call's window grid, so inside the body the two must agree to
float precision (an untrained network is the hard case: it has no confident margins that would hide a
different answer). ``window_grid=body`` tiles the body's box with its own grid: fewer windows, other numbers.

Printed: seconds and throughput (Mvoxel/s) of both and their ratio, windows run/skipped, peak RSS (process
high-water mark inside each step, and above the RSS before it) and its ratio, label agreement and the max
abs difference of the class probabilities inside the body. Then medseg's memory-bounded mode on the larger
volume: peak RSS relative to the input's bytes (goal <= 3x), counting the input (already in memory) plus
everything prediction added, and the part of that which is the network's own working memory (constant,
independent of the scan size), measured on one window (memory-bounded mode on the CPU runs the network
window by window). Numbers depend on the machine: say which.

Precision (``inference.precision``, on by default, ``--skip-precision`` leaves it out): on a third, small volume
(``--precision-shape``), ``Predictor.predict`` in fp32 and under bf16 autocast (the self-check's threshold set to 0,
so bf16 is what is timed; the agreement it measured is printed), and the network alone on one window batch in
fp32, bf16 autocast and, when the export extra is installed, ONNX Runtime (the ``medseg export`` ONNX file); all as
ratios to fp32 in the same run, with label agreement and the largest logit difference to fp32. Whether the CPU has
native bf16 (``avx512_bf16`` / ``amx_bf16``) is printed: without it bf16 is emulated and expected to lose.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.inferers import sliding_window_inference  # noqa: E402

from medseg.config import load_config  # noqa: E402
from medseg.data.phantom import write_phantom  # noqa: E402
from medseg.inference.model_package import load_package, save_package  # noqa: E402
from medseg.inference.options import apply_inference_overrides  # noqa: E402
from medseg.inference.predictor import Predictor  # noqa: E402
from medseg.models import build_model  # noqa: E402
from medseg.runtime.memory import PeakMemory  # noqa: E402
from medseg.runtime.precision import cpu_has_native_bf16  # noqa: E402

LOWER, UPPER = -200.0, 300.0
REPO = Path(__file__).resolve().parents[1]
NNUNET_PYTHON = REPO / ".venv-nnunet" / "bin" / "python"  # `make bench-nnunet-env`


def nnunet_predictor(python: Path, tmp: Path, vol: np.ndarray, net: torch.nn.Module, spacing: list[float], roi,
                     overlap: float, classes: int, rounds: int) -> tuple[np.ndarray, dict] | None:
    """nnU-Net v2's predictor on ``vol`` with the same network (``nnunet_reference.py`` in its own venv, TorchScript
    network), or None with a message when that venv is missing. Returns (labels, {seconds, peak_rss_mib, ...})."""
    if not python.is_file():
        print(f"  nnU-Net predictor: skipped ({python} missing; `make bench-nnunet-env` installs nnunetv2 2.8.1 there)")
        return None
    np.save(tmp / "nnunet_volume.npy", vol)
    with torch.no_grad():  # traced outside inference mode: its tensors could not be saved
        torch.jit.trace(copy.deepcopy(net).eval(), torch.zeros(1, 1, *roi)).save(str(tmp / "nnunet_network.pt"))
    argv = [str(python), str(REPO / "benchmarks" / "nnunet_reference.py"), "--volume", str(tmp / "nnunet_volume.npy"),
            "--network", str(tmp / "nnunet_network.pt"), "--out", str(tmp / "nnunet_out.npz"),
            "--spacing", *map(str, spacing), "--roi", *map(str, roi), "--overlap", str(overlap), "--classes", str(classes),
            "--lower", str(LOWER), "--upper", str(UPPER), "--threads", str(torch.get_num_threads()), "--rounds", str(rounds)]
    subprocess.run(argv, check=True)
    out = np.load(tmp / "nnunet_out.npz")
    return out["labels"], json.loads(str(out["info"]))


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU volume: air (-1000) around an elliptic body (~55% of each slice) with three organs and noise."""
    rng = np.random.default_rng(seed)
    x, y = np.ogrid[:shape[0], :shape[1]]
    cx, cy = shape[0] / 2, shape[1] / 2
    body2d = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 <= 1
    vol = np.full(shape, -1000, np.int16)
    z0, z1 = int(0.05 * shape[2]), int(0.95 * shape[2])
    vol[:, :, z0:z1][body2d] = 40
    zz = np.arange(shape[2])[None, None, :]
    for (fx, fy, fz, r, hu) in ((0.4, 0.45, 0.5, 0.12, 60), (0.62, 0.5, 0.45, 0.07, 110), (0.5, 0.6, 0.55, 0.05, 180)):
        organ = ((x[..., None] - fx * shape[0]) ** 2 + (y[..., None] - fy * shape[1]) ** 2) / (r * shape[0]) ** 2 \
            + ((zz - fz * shape[2]) / (2.5 * r * shape[2])) ** 2 <= 1
        vol[organ] = hu
    noise = rng.normal(0, 10, size=shape[:2]).astype(np.int16)  # one noise plane, repeated (cheap)
    vol[vol > -1000] += np.broadcast_to(noise[..., None], shape)[vol > -1000]
    return vol


def build_package(tmp: Path, roi: tuple[int, ...], overlap: float, sw_batch: int, channels: list[int],
                  spacing: str = "null"):
    manifest = write_phantom(tmp / "ph", cases=2, seed=0, val_fraction=0.5, shape=(32, 32, 16), spacing=(3.0, 3.0, 4.0))
    cfg = load_config("phantom_unet3d", [f"data.manifest={manifest.path}", f"data.spacing={spacing}",
                                         f"data.patch_size={list(roi)}", f"model.params.channels={channels}",
                                         f"inference.overlap={overlap}", f"inference.sw_batch_size={sw_batch}"])
    torch.manual_seed(0)
    net = build_model(cfg.model.name, 3, manifest.num_channels, manifest.num_classes, cfg.model.params)
    save_package(tmp / f"pkg-{spacing}", net, cfg, manifest)
    return load_package(tmp / f"pkg-{spacing}")


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def plain_monai(vol: np.ndarray, net: torch.nn.Module, roi, overlap: float, sw_batch: int) -> tuple[np.ndarray, torch.Tensor]:
    """The reference: the same network on the whole volume, no body crop."""
    x = torch.from_numpy(vol).float()
    x = ((x.clamp(LOWER, UPPER) - LOWER) / (UPPER - LOWER))[None, None]
    with torch.no_grad():
        logits = sliding_window_inference(x, roi, sw_batch, net, overlap=overlap, mode="gaussian")
    probs = torch.softmax(logits, 1)[0]
    return probs.argmax(0).numpy().astype(np.uint8), probs


def timed(fn):
    gc.collect()
    before = rss_mb()
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, pm.peak_mb, pm.peak_mb - before


def median_time(fn, rounds: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``rounds`` calls, and its last result."""
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def network_precisions(pkg, tmp: Path, windows: torch.Tensor, rounds: int) -> None:
    """The network alone on one window batch: fp32, bf16 autocast, ONNX Runtime (if installed); ratios to fp32."""
    net = pkg.build("cpu")
    runs = {"fp32": lambda: net(windows),
            "bf16 autocast": lambda: _autocast_bf16(net, windows)}
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        import onnxruntime

        from medseg.inference.export import export_package

        export_package(pkg, "onnx", tmp / "onnx")
        session = onnxruntime.InferenceSession(str(tmp / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        runs["ONNX Runtime"] = lambda: torch.from_numpy(session.run(None, {"image": windows.numpy()})[0])
    else:
        print("    ONNX Runtime: not measured (pip install 'medseg[export]')")
    with torch.inference_mode():
        results = {name: median_time(fn, rounds) for name, fn in runs.items()}
    t32, ref = results["fp32"]
    for name, (t, out) in results.items():
        out = out.float()
        print(f"    network, {windows.shape[0]} window(s) of {tuple(windows.shape[2:])}, {name}: {t:7.3f} s  "
              f"{t / t32:5.2f}x fp32's time; argmax agreement {float((out.argmax(1) == ref.argmax(1)).float().mean()):.4f}, "
              f"max |logit diff| {float((out - ref).abs().max()):.3g}")


def _autocast_bf16(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x)


def precision_cases(pkg, tmp: Path, shape: tuple[int, int, int], roi, sw_batch: int, rounds: int) -> None:
    """``Predictor.predict`` in fp32 and bf16 on one volume, then the network alone (``network_precisions``)."""
    import warnings

    native = cpu_has_native_bf16()
    print(f"\nprecision, volume {shape} int16; CPU native bf16 (avx512_bf16/amx_bf16): {'yes' if native else 'no'}")
    vol = synthetic_ct(shape)
    img = nib.Nifti1Image(vol, np.diag([0.8, 0.8, 1.5, 1.0]))
    body = vol > -500
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without it warns once: said above
        preds = {s: Predictor(apply_inference_overrides(pkg, [f"inference.precision={s}",
                                                              "inference.precision_min_agreement=0"]), device="cpu")
                 for s in ("fp32", "bf16")}
    for p in preds.values():  # warm-up: oneDNN primitives outside the timings (also runs bf16's self-check)
        p.predict(img, name="synthetic")
    results = {s: median_time(lambda p=p: p.predict(img, name="synthetic"), rounds) for s, p in preds.items()}
    t32, ref = results["fp32"]
    for s, (t, pred) in results.items():
        agree = float((pred.labels == ref.labels)[body].mean())
        print(f"  medseg predict, inference.precision={s}: {t:7.2f} s  {t / t32:5.2f}x fp32's time; "
              f"label agreement with fp32 inside the body {agree:.4f}")
    print(f"    bf16 self-check (first window batch of the batch): argmax agreement {preds['bf16'].autocast.agreement}")
    windows = torch.rand(sw_batch, 1, *roi, generator=torch.Generator().manual_seed(0))
    network_precisions(pkg, tmp, windows, rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--bounded-shape", type=int, nargs=3, default=[512, 512, 600])
    ap.add_argument("--roi", type=int, nargs=3, default=[96, 96, 64])
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--sw-batch", type=int, default=4)
    ap.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--grids", nargs="+", default=["whole", "body"], choices=["whole", "body"],
                    help="inference.window_grid settings to compare with the plain call")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    ap.add_argument("--skip-compare", action="store_true", help="only the memory-bounded run")
    ap.add_argument("--skip-bounded", action="store_true", help="only the comparison with plain MONAI")
    ap.add_argument("--skip-precision", action="store_true", help="leave out fp32 vs bf16 vs ONNX Runtime")
    ap.add_argument("--precision-shape", type=int, nargs=3, default=[160, 160, 64],
                    help="volume of the precision cases (bf16 is emulated, slow, on CPUs without native bf16)")
    ap.add_argument("--precision-rounds", type=int, default=1, help="timing rounds of the precision cases (median)")
    ap.add_argument("--nnunet-python", type=Path, default=NNUNET_PYTHON,
                    help="python of a venv with nnunetv2 (the second reference; skipped with a message when missing)")
    ap.add_argument("--bounded-spacing", type=float, nargs=3, default=[1.0, 1.0, 1.5],
                    help="also run memory-bounded mode for a model trained at this spacing (the scan is 0.8x0.8x1.5 mm): "
                         "resampled to the model's grid and back slab by slab; 0 0 0 skips it")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device cpu; roi {args.roi}, overlap {args.overlap}, sw_batch {args.sw_batch}")
    with tempfile.TemporaryDirectory() as d:
        pkg = build_package(Path(d), tuple(args.roi), args.overlap, args.sw_batch, args.channels)
        affine = np.diag([0.8, 0.8, 1.5, 1.0])
        if not args.skip_compare:
            vol = synthetic_ct(tuple(args.shape))
            img = nib.Nifti1Image(vol, affine)
            predictor = Predictor(pkg, device="cpu")
            net = copy.deepcopy(predictor.model).to(memory_format=torch.contiguous_format)  # the plain reference layout
            with torch.inference_mode():  # warm-up: oneDNN primitives and first-touch memory outside the timings
                net(torch.zeros(args.sw_batch, 1, *args.roi))
            nvox = vol.size / 1e6
            body = vol > -500
            # Rounds interleave the plain call and each medseg setting, so drifts of a shared machine hit all alike;
            # the median time of each is reported (the outputs and peak memory are the same in every round).
            plain_batches = {"plain MONAI, sw_batch_size=1 (default)": 1,
                             f"plain MONAI, sw_batch_size={args.sw_batch}": args.sw_batch}
            times: dict[str, list[float]] = {k: [] for k in [*plain_batches, *args.grids]}
            plain_peaks: dict[str, tuple[float, float]] = {}
            runs: dict[str, tuple] = {}
            predictors = {g: Predictor(apply_inference_overrides(pkg, [f"inference.window_grid={g}"]), device="cpu") for g in args.grids}
            for _ in range(args.rounds):
                for ref, batch in plain_batches.items():
                    (plain_labels, plain_probs), t_plain, peak_plain, d_plain = timed(
                        lambda: plain_monai(vol, net, tuple(args.roi), args.overlap, batch))
                    times[ref].append(t_plain)
                    plain_peaks[ref] = (peak_plain, d_plain)
                for grid, p in predictors.items():
                    pred, t_med, peak_med, d_med = timed(lambda: p.predict(img, name="synthetic"))
                    times[grid].append(t_med)
                    runs[grid] = (pred, peak_med, d_med)
            t_plains = {ref: float(np.median(times[ref])) for ref in plain_batches}
            print(f"\nvolume {tuple(args.shape)} int16 ({vol.nbytes / 2**20:.0f} MiB), body {body.mean():.0%} of voxels; "
                  f"median of {args.rounds} interleaved rounds")
            for ref, t_plain in t_plains.items():
                peak_plain, d_plain = plain_peaks[ref]
                print(f"  {ref}: {t_plain:7.2f} s  {nvox / t_plain:7.2f} Mvox/s  peak RSS {peak_plain:7.0f} MiB (+{d_plain:.0f})"
                      f"   [rounds: {', '.join(f'{t:.1f}' for t in times[ref])} s]")
            for grid, p in predictors.items():
                pred, peak_med, d_med = runs[grid]
                t_med = float(np.median(times[grid]))
                with torch.inference_mode():
                    med_probs = p.probabilities_inverted(p.from_image(img, "synthetic"), "synthetic")
                diff = float((med_probs - plain_probs).abs().amax(0)[torch.from_numpy(body)].max())
                agree = float((pred.labels == plain_labels)[body].mean())
                print(f"  medseg, window_grid={grid}: {t_med:7.2f} s  {nvox / t_med:7.2f} Mvox/s  peak RSS {peak_med:7.0f} MiB "
                      f"(+{d_med:.0f}); ran {pred.windows.get('run')} windows, skipped {pred.windows.get('skipped')} body-free"
                      f"   [rounds: {', '.join(f'{t:.1f}' for t in times[grid])} s]")
                for ref, t_plain in t_plains.items():
                    print(f"    vs {ref}: throughput {t_plain / t_med:.2f}x, "
                          f"peak-RSS increase {d_med / max(plain_peaks[ref][1], 1):.2f}x")
                print(f"    inside the body, vs the sw_batch_size={args.sw_batch} plain call: label agreement {agree:.5f}, "
                      f"max |prob diff| {diff:.3g}")
                del pred, med_probs
            ref = nnunet_predictor(args.nnunet_python, Path(d), vol, net, [0.8, 0.8, 1.5], tuple(args.roi), args.overlap,
                                   pkg.num_classes, args.rounds)
            if ref is not None:
                nn_labels, info = ref
                t_nn = info["seconds"]
                print(f"  nnU-Net v2 predictor (predict_single_npy_array, same network, Gaussian, no mirroring): {t_nn:7.2f} s"
                      f"  {nvox / t_nn:7.2f} Mvox/s  peak RSS {info['peak_rss_mib']:7.0f} MiB (its process)"
                      f"   [rounds: {', '.join(f'{t:.1f}' for t in info['rounds'])} s]")
                for ref_name, t_plain in t_plains.items():
                    print(f"    vs {ref_name}: throughput {t_plain / t_nn:.2f}x")
                for grid in args.grids:
                    print(f"    medseg window_grid={grid} vs nnU-Net: throughput {t_nn / float(np.median(times[grid])):.2f}x")
                print(f"    inside the body, vs the sw_batch_size={args.sw_batch} plain call: label agreement "
                      f"{float((nn_labels == plain_labels)[body].mean()):.5f} (its own window grid and Gaussian weights)")
            del predictors, runs
            del vol, img, plain_labels, plain_probs, predictor
        if not args.skip_bounded:
            vol = synthetic_ct(tuple(args.bounded_shape))
            img = nib.Nifti1Image(vol, affine)
            mb = vol.nbytes / 2**20
            print(f"\nmemory-bounded, volume {tuple(args.bounded_shape)} int16 ({mb:.0f} MiB, already in memory)")
            packages = {"no resampling": pkg}
            if any(args.bounded_spacing):
                spacing = "[" + ",".join(f"{v:g}" for v in args.bounded_spacing) + "]"
                packages[f"model spacing {spacing} mm"] = build_package(Path(d), tuple(args.roi), args.overlap, args.sw_batch,
                                                                        args.channels, spacing)
            for what, package in packages.items():
                bounded = Predictor(apply_inference_overrides(package, ["inference.memory_bounded=true"]), device="cpu")
                pred, t_b, peak_b, d_b = timed(lambda: bounded.predict(img, name="synthetic-large"))
                window = torch.zeros(1, 1, *args.roi)  # memory-bounded mode on the CPU runs one window per network call
                _, _, _, d_net = timed(lambda: bounded.predict_fn(window))
                print(f"  medseg, {what}: {t_b:7.2f} s  {vol.size / 1e6 / t_b:7.2f} Mvox/s  peak RSS {peak_b:7.0f} MiB, "
                      f"+{d_b:.0f} MiB above the RSS before; ran {pred.windows.get('run')} windows")
                print(f"    peak RSS / input bytes: {peak_b / mb:.2f}x (whole process incl. torch), "
                      f"{(d_b + mb) / mb:.2f}x (input + what prediction added); goal <= 3x")
                print(f"    of which the network's working memory on one window: {d_net:.0f} MiB "
                      f"(independent of the scan); without it {(d_b - d_net + mb) / mb:.2f}x")
                del pred, bounded
        if not args.skip_precision:
            precision_cases(pkg, Path(d), tuple(args.precision_shape), tuple(args.roi), args.sw_batch,
                            args.precision_rounds)


if __name__ == "__main__":
    main()
