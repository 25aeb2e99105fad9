"""`ray job submit` entry point: raysynth tune.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- python jobs/tune.py --preset smoke --out /mnt/shared/run1

Takes the same options as `raysynth tune`. Inside a job, RAY_ADDRESS is set, so the stages join the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working_dir holds raysynth/

from raysynth.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
