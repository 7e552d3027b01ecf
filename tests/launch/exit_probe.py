"""``python -m tests.launch.exit_probe CONFIG [key=value ...]``: ``launch.train``, then, as the
interpreter exits, one line saying whether a process group is still alive (a run tears its groups
down itself: a gloo group left alive can abort the process as it exits)."""

import atexit
import sys

import torch.distributed as dist

from launch.train import main

if __name__ == "__main__":  # not in the data workers, which start by importing this module
    atexit.register(lambda: print(f"process group alive at exit: {dist.is_initialized()}",
                                  flush=True))
    main(sys.argv[1:])
