"""Runs over many slides on dask.distributed; each slide goes through ``pipeline.run.run_slide``.

- ``inputs``: the slides of a folder tree or a list file.
- ``naming``: a unique, safe output folder name per slide.
- ``tasks``: the per-slide task that runs on a worker, with its log file.
- ``cluster``: a LocalCluster sized to the machine, or a connection to an existing scheduler.
- ``batch``: the runner: resume, submission, failures, timeouts.
- ``status`` and ``report``: the CSV status table and the HTML report.
- ``recipes/``: how to run a batch on an existing cluster (SLURM, a plain scheduler and workers).
"""
