"""A bcseg-wsi batch on a SLURM cluster through dask-jobqueue.

The tests do not run it, and dask-jobqueue is not a dependency of bcseg-wsi. Install it
(``pip install dask-jobqueue``) in the shared environment first. Then adapt the queue, account,
memory, walltime and GPU lines to your site, and run this script on a login node:

    python workflows/recipes/slurm_jobqueue.py /shared/slides /shared/results

The scheduler runs in this process; each SLURM job runs workers that connect back to it. The
slides and the output folder must be on a file system that the login node and the compute nodes
share, under the same paths.
"""

from __future__ import annotations

import argparse
import sys

import dask
from dask_jobqueue import SLURMCluster

from bcseg.cli import main as bcseg_main

# Per SLURM job: 8 cores and one GPU, one dask worker with one thread (a slide uses the cores).
JOB_CORES = 8
JOB_MEMORY = "64GB"
JOBS = 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="folder of slides, or a CSV or text list")
    parser.add_argument("out", help="output folder on the shared file system")
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"SLURM jobs to start (default: {JOBS})")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    # One retry for a slide whose worker dies, as in a local batch.
    dask.config.set({"distributed.scheduler.allowed-failures": 1})
    cluster = SLURMCluster(
        queue="gpu",  # your partition
        account=None,  # your account, if the site needs one
        cores=JOB_CORES,
        processes=1,  # one worker per job ...
        memory=JOB_MEMORY,
        walltime="04:00:00",
        job_extra_directives=["--gres=gpu:1"],  # ... with the job's GPU; drop for CPU-only jobs
        worker_extra_args=["--nthreads", "1", "--resources", "GPU=1"],  # drop GPU=1 for CPU-only jobs
        job_script_prologue=["source /shared/venvs/bcseg/bin/activate"],
    )
    cluster.scale(jobs=args.jobs)
    try:
        # The batch waits for workers as they arrive; rerun this script to resume after a
        # walltime limit, and complete slides are skipped.
        return bcseg_main(["batch", args.input, "--out", args.out, "--scheduler", cluster.scheduler_address])
    finally:
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
