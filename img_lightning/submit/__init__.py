"""``img-submit``: the whole IMG pipeline as SLURM jobs chained with ``--dependency=afterok``.

:mod:`.plan` turns a ``configs/pipeline`` recipe into stages (the ``slurm/*.sbatch`` submission of
each, where it writes), :mod:`.done` tells whether a stage's output is already there and sound,
:mod:`.submit` submits what is not.
"""
