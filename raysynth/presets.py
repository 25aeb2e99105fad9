"""Named starting points for the config: partial trees laid over the schema's defaults.

``load_config(preset, file, overrides)`` (raysynth.config) starts from one of these; a preset
names only the values that differ from the defaults of :class:`raysynth.config.Config`.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # CI-sized: end to end in well under 3 minutes on 2 cores.
    "smoke": {
        "data": {"image_size": 16, "num_scans": 48},
        "cv": {"folds": 2},
        "diffusion": {"channels": [16, 32], "train_steps": 30, "batch_size": 16, "checkpoint_every": 15, "max_train_images": None,
                      "log_every": 10},
        "sampling": {"steps": 5, "ratio": 0.5, "batch_size": 32, "shard_size": 32, "max_actors": 1},
        "study": {"seeds": [0], "epochs": 2, "width": 8},
        "quality": {"encoder_epochs": 2, "feature_dim": 16},
        "robustness": {"severities": [1, 3, 5], "external_scans": 24},
        "tune": {"num_samples": 3, "trial_steps": 20, "eval_every": 10, "grace_period": 10, "eval_samples": 16,
                 "eval_steps": 4},
    },
    # The README's main command: 557 scans at 32x32, 4 folds, a 1200-step generator per fold on at
    # most 350 scans (as in the paper). Rectified flow with 10 Euler steps: on real MRI (4class,
    # bench/objectives.py, BENCHMARKS.md "Objectives") it gave FD 0.86x real-vs-real and no
    # intensity lift, where DDPM epsilon with DDIM-50 gave 65x and a background lifted by +0.57.
    # Class dropout 0.1 as measured; it also lets sampling.guidance_scale be turned up.
    "default": {
        # bf16 training where the CPU has it natively (AVX512-BF16/AMX), detected per worker.
        "diffusion": {"process": "flow", "class_dropout": 0.1, "cpu_bf16": "auto"},
        "sampling": {"sampler": "euler", "steps": 10},
    },
    # A cloud GPU cluster: bigger images and networks, GPU workers and actors; the process and
    # sampler that measured best on real MRI (see "default").
    # Latent diffusion on a cloud GPU: 256x256 slices (with --dims 3 --set data.image_size=128, 128^3
    # volumes), a per-fold autoencoder to 64x64x4 latents with a patch-GAN loss, and the process
    # and sampler that measured best on real MRI (see "default").
    "gpu": {
        "data": {"image_size": 256},
        "cv": {"folds": 5},
        "autoencoder": {"channels": [64, 128, 128], "latent_channels": 4, "num_res_blocks": 2,
                        "adversarial_weight": 0.01, "train_steps": 20000, "batch_size": 32,
                        "checkpoint_every": 2000, "learning_rate": 1e-4},
        "diffusion": {"process": "flow", "class_dropout": 0.1, "space": "latent",
                      "channels": [64, 128, 256, 256], "layers_per_block": 2, "attention": True,
                      "train_steps": 30000, "batch_size": 64, "use_gpu": True, "num_workers": 4,
                      "checkpoint_every": 2000, "learning_rate": 1e-4, "ema_decay": 0.9999},
        "sampling": {"batch_size": 256, "max_actors": 8, "gpus_per_actor": 1.0, "steps": 10,
                     "sampler": "euler"},
        "study": {"seeds": [0, 1, 2], "epochs": 40, "width": 32, "gpus_per_trial": 0.25},
        "quality": {"encoder_epochs": 30, "feature_dim": 128},
        "tune": {"num_samples": 32, "trial_steps": 5000, "eval_every": 500, "grace_period": 1000,
                 "reduction_factor": 3.0, "eval_samples": 512, "eval_steps": 20, "processes": ["ddpm", "gamma"],
                 "cpus_per_trial": 2, "gpus_per_trial": 0.25},
    },
}


# Latent diffusion on a laptop CPU: 128x128 slices through a per-fold autoencoder (factor 4) to
# 32x32x4 latents, so the denoiser costs what the default preset's 32x32 pixel denoiser costs.
PRESETS["latent"] = {
    "data": {"image_size": 128},
    "diffusion": {**PRESETS["default"]["diffusion"], "space": "latent"},
    # Widths [16, 32, 32]: at 128x128 a [32, 64, 64] autoencoder step (batch 16) took about 2 s on
    # 2 cores (bench/latent.py), 35 min a fold for 1000 steps; these cost about a quarter.
    "autoencoder": {"channels": [16, 32, 32], "train_steps": 600, "batch_size": 16},
    "sampling": PRESETS["default"]["sampling"],
}
# The same for volumes: 64^3 through an autoencoder to 16^3x4 latents (use with --dims 3).
PRESETS["latent3d"] = {
    "data": {"dims": 3, "image_size": 64, "num_scans": 200},
    "diffusion": {**PRESETS["default"]["diffusion"], "space": "latent", "channels": [32, 64], "batch_size": 8,
                  "train_steps": 800},
    "autoencoder": {"channels": [16, 32, 32], "train_steps": 600, "batch_size": 4},
    "sampling": {**PRESETS["default"]["sampling"], "batch_size": 8},
}


def preset_names() -> list[str]:
    return list(PRESETS)
