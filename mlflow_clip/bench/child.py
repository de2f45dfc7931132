"""The benchmark's child processes start here: `python -m mlflow_clip.bench.child TASK SPEC RESULT [FD]`."""

import sys

from mlflow_clip.bench.run import _child_main

if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
