"""Learning on the node: fine-tune a classifier's head (and the hidden layer
before it) on labelled site samples.

No torch: the head (the last Gemm/MatMul before the class scores) is found in
the ONNX graph (:mod:`.head`), the features feeding it are computed by ONNX
Runtime (:mod:`.features`), a softmax regression warm-started from the
deployed weights is trained in numpy (:mod:`.train`; with the hidden layer
before the head, when the model has one, by backpropagation), the weights are written
back into a copy of the graph and checked (:mod:`.export`), and models are
scored on labelled inputs (:mod:`.evaluate`). :mod:`.finetune_job` runs all of
it as a checkpointed training job under the node's scheduler. See
docs/learning.md.

The submodules are imported on use (``onnx`` takes about a second to import);
``from edge_node.learning import find_head`` works (``evaluate`` is the submodule;
its function is ``edge_node.learning.evaluate.evaluate``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NotFineTunable": "head", "Head": "head", "find_head": "head", "find_app_head": "head",
    "read_head": "head", "load_app": "head", "find_body": "head", "find_layers": "head",
    "FeatureExtractor": "features", "extract_features": "features",
    "TrainConfig": "train", "TrainResult": "train", "HeadTrainer": "train",
    "fine_tune": "train", "head_scores": "train", "DeepTrainer": "train",
    "mlp_logits": "train",
    "ExportError": "export", "write_head": "export", "export_head": "export",
    "validate": "export", "export_layers": "export", "validate_layers": "export",
    "Evaluation": "evaluate", "evaluate_app": "evaluate",
    "predict_scores": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
