"""Cross-dataset generalisation: every method x training set x test set, on a Ray cluster.

``crosseval(config)`` trains each (method, training set), or reuses the checkpoint an
earlier run left for the same configuration, embeds each test split once per checkpoint,
evaluates every cell (in-domain ones included) with the streaming evaluator, and writes a
report. What runs is a small job graph:

    train (method, train set) -> embed (checkpoint, test set) -> eval (cell)

Modules: :mod:`.plan` resolves datasets (through :mod:`tpr_ray.data.registry`) and recipes
into ``TrainConfig`` objects and keys; :mod:`.cells` holds the three jobs and the
resources each declares, derived from its config; :mod:`.scheduler` fits jobs to the
cluster's free CPUs and GPUs; :mod:`.matrix` drives the graph and records the cells. A
failing job marks its cells failed, with the error, and the others go on.

Output folder::

    data/<name>/                                synthetic datasets, generated on first use
    runs/<method>-<train>-<key>/                training runs (Ray Train storage)
    embeddings/<method>-<train>-<key>/<test>-<key>/{gallery,queries}/
    cells/<method>__<train>__<test>-<key>.json  one result per cell
    report/                                     matrix.csv, matrix.md, heatmap-<method>.png, index.html
"""

from tpr_ray.crosseval.matrix import CrossEvalResult, crosseval
from tpr_ray.crosseval.plan import CrossEvalConfig, backbone_choice, config_key, plan

__all__ = ["CrossEvalConfig", "CrossEvalResult", "backbone_choice", "config_key", "crosseval", "plan"]
