"""The pipeline's stages, one module each; every stage is a Python function taking a config and
returning a :class:`StageResult` (also what ``cmpnas <command>`` and ``cmpnas run`` call).

    from cmpnas.stages import train_gallery, train_query, evaluate_models
"""

from __future__ import annotations

from cmpnas.stages.common import StageResult, load_data
from cmpnas.stages.evaluate import evaluate_index, evaluate_models, evaluate_protocol, evaluate_query_models
from cmpnas.stages.export import export_model
from cmpnas.stages.family import export_family, retrain_family
from cmpnas.stages.gallery import train_gallery
from cmpnas.stages.index import index_dataset, index_gallery
from cmpnas.stages.query import retrain, train_query
from cmpnas.stages.search import search
from cmpnas.stages.study import study
from cmpnas.stages.supernet import train_supernet
from cmpnas.stages.upgrade import evaluate_upgrade, train_transformation, upgrade_gallery

__all__ = [
    "StageResult",
    "evaluate_models",
    "evaluate_index",
    "evaluate_protocol",
    "evaluate_query_models",
    "evaluate_upgrade",
    "export_family",
    "export_model",
    "index_dataset",
    "index_gallery",
    "load_data",
    "retrain",
    "retrain_family",
    "search",
    "study",
    "train_gallery",
    "train_query",
    "train_supernet",
    "train_transformation",
    "upgrade_gallery",
]
