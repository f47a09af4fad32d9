"""Evaluation of frozen dense features: linear probe, Hummingbird retrieval, overclustering,
correspondence PCK and CLS kNN, with a visual report. Entry point: `evaluate` (see protocols.py)."""

from cotap.training.eval.correspondence import CorrespondenceConfig
from cotap.training.eval.datasets import (
    EvalDataset,
    EvalItem,
    from_arrays,
    from_synthetic,
    open_eval_data,
    split,
)
from cotap.training.eval.features import FeatureConfig, Features, FrozenModel, extract_features
from cotap.training.eval.geometry import WarpConfig
from cotap.training.eval.knn import KnnConfig
from cotap.training.eval.linear import LinearConfig
from cotap.training.eval.overcluster import OverclusterConfig
from cotap.training.eval.protocols import PROTOCOLS, EvalConfig, Evaluator, config_from_dict, evaluate
from cotap.training.eval.retrieval import RetrievalConfig

__all__ = [
    "PROTOCOLS",
    "CorrespondenceConfig",
    "EvalConfig",
    "EvalDataset",
    "EvalItem",
    "Evaluator",
    "FeatureConfig",
    "Features",
    "FrozenModel",
    "KnnConfig",
    "LinearConfig",
    "OverclusterConfig",
    "RetrievalConfig",
    "WarpConfig",
    "config_from_dict",
    "evaluate",
    "extract_features",
    "from_arrays",
    "from_synthetic",
    "open_eval_data",
    "split",
]
