"""`ray job submit` entry point: raysynth robustness (corrupted test parts and the external test set, without retraining).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/robustness.py --preset smoke --out /mnt/shared/run1 --external-test /mnt/shared/site2

Takes the same options as `raysynth robustness`. Inside a job, RAY_ADDRESS is set, so the stages join the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working_dir holds raysynth/

from raysynth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["robustness", *sys.argv[1:]]))
