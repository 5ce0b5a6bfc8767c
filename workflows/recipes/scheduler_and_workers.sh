#!/usr/bin/env bash
# A dask scheduler and workers started by hand, then a batch on them.
#
# Adapt the host names, paths and counts to your site. Every machine needs the same virtual
# environment with bcseg-wsi installed, and the same path to the slides and the output folder
# (a shared file system). Run each block on the machine named in its comment.
set -euo pipefail

VENV=/shared/venvs/bcseg          # the same environment on every machine
SCHEDULER_HOST=node01             # runs the scheduler
SCHEDULER=tcp://${SCHEDULER_HOST}:8786

# On node01: the scheduler. One retry for a slide whose worker dies, as in a local batch.
#   DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=1 \
#       "$VENV/bin/dask" scheduler --host "$SCHEDULER_HOST" --port 8786

# On each CPU machine: workers with one thread each, sharing the cores (here 4 workers on a
# 16-core machine, 4 cores per slide).
#   "$VENV/bin/dask" worker "$SCHEDULER" --nworkers 4 --nthreads 1 --memory-limit 16GB

# On each GPU machine: one worker per GPU, each seeing only its own GPU and offering the GPU
# resource, so that every slide gets a GPU to itself.
#   for gpu in 0 1 2 3; do
#       CUDA_VISIBLE_DEVICES=$gpu "$VENV/bin/dask" worker "$SCHEDULER" --nthreads 1 \
#           --resources GPU=1 --name "$(hostname)-gpu$gpu" &
#   done

# On any machine with the environment and the shared file system: the batch itself. Rerun the
# same command after an interruption; complete slides are skipped.
"$VENV/bin/bcseg-wsi" batch /shared/slides --out /shared/results --scheduler "$SCHEDULER"
