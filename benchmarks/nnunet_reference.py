"""nnU-Net v2's predictor on one volume with a given network: the second reference of ``benchmarks/inference.py``.

Runs in its own virtual environment (``make bench-nnunet-env``: torch 2.13.0 CPU + nnunetv2 2.8.1), because
nnunetv2 pulls a torchvision that does not import beside the CPU torch wheel in medseg's venv. Nothing here imports
medseg or MONAI: the network comes as a TorchScript file, the scan as a ``.npy`` array.

    .venv-nnunet/bin/python benchmarks/nnunet_reference.py --volume V.npy --network NET.pt --out OUT.npz \\
        --spacing 0.8 0.8 1.5 --roi 96 96 64 --overlap 0.25 --classes 4 --lower -200 --upper 300 --threads 2

``nnUNetPredictor.manual_initialization`` takes the network with plans written here for the benchmark's setting:
the scan's own spacing (no resampling), nnU-Net's ``CTNormalization`` with its percentiles and mean/std chosen so it
computes exactly the window medseg's package uses (clip to [lower, upper], then (x - lower) / (upper - lower)),
the ROI as patch size, ``tile_step_size = 1 - overlap``, Gaussian blending, no mirroring. Then
``predict_single_npy_array`` (preprocessing, sliding window, export to labels) is timed: best of ``--rounds``.
Writes the labels (uint8) and {seconds, rounds, peak RSS MiB of this process} to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

RESAMPLE = "resample_data_or_seg_to_shape"


def plans_for(spacing: list[float], roi: list[int], lower: float, upper: float) -> dict:
    """A one-configuration nnU-Net plans dict for a single-channel CT at ``spacing`` with window [lower, upper]."""
    config = {
        "data_identifier": "bench", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": list(roi), "median_image_size_in_voxels": list(roi), "spacing": list(spacing),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": RESAMPLE, "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": RESAMPLE, "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": RESAMPLE,
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False,
        # never built: manual_initialization takes the benchmark's network (the key only marks the current format)
        "architecture": {"network_class_name": "given", "arch_kwargs": {}, "_kw_requires_import": []},
    }
    return {
        "dataset_name": "Dataset999_Bench", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(roi), "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": config},
        "experiment_planner_used": "manual",
        # CTNormalization: clip to [percentile_00_5, percentile_99_5], then (x - mean) / std = medseg's window.
        "foreground_intensity_properties_per_channel": {
            "0": {"mean": lower, "std": upper - lower, "percentile_00_5": lower, "percentile_99_5": upper,
                  "max": upper, "min": lower, "median": (lower + upper) / 2}
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", required=True)
    ap.add_argument("--network", required=True, help="TorchScript file of the network")
    ap.add_argument("--out", required=True)
    ap.add_argument("--spacing", type=float, nargs=3, required=True)
    ap.add_argument("--roi", type=int, nargs=3, required=True)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--classes", type=int, required=True)
    ap.add_argument("--lower", type=float, required=True)
    ap.add_argument("--upper", type=float, required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()

    vol = np.load(a.volume)
    net = torch.jit.load(a.network, map_location="cpu").eval()
    plans = PlansManager(plans_for(a.spacing, a.roi, a.lower, a.upper))
    dataset = {"labels": {"background": 0, **{f"class{k}": k for k in range(1, a.classes)}}, "channel_names": {"0": "CT"},
               "file_ending": ".nii.gz", "numTraining": 1}
    predictor = nnUNetPredictor(tile_step_size=1.0 - a.overlap, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(net, plans, plans.get_configuration("3d_fullres"), [net.state_dict()], dataset,
                                    "nnUNetTrainer", None)
    torch.set_num_threads(a.threads)
    times, labels = [], None
    image = vol[None].astype(np.float32)  # (channels, *spatial) float32, as nnU-Net's own readers return it
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        labels = predictor.predict_single_npy_array(image, {"spacing": list(a.spacing)})
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    np.savez(a.out, labels=np.asarray(labels, dtype=np.uint8),
             info=json.dumps({"seconds": min(times), "rounds": times, "peak_rss_mib": peak, "threads": a.threads}))


if __name__ == "__main__":
    main()
