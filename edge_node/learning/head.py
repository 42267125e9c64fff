"""Find the fine-tunable head of an ONNX classifier.

The head is the last linear layer before the class scores: a ``Gemm``, or a
``MatMul`` (optionally followed by an ``Add`` of a bias), whose weights are
initializers and whose output reaches the class-score output only through
``Softmax`` and ``Identity``::

    feature --MatMul(W)--> --Add(b)--> logits --Softmax--> --Identity--> probabilities

The class-score output is the manifest's ``postprocess.output`` (or the name
given); without either, the graph's first output, as the worker does. A
manifest ``learning.head`` (a node name, or the name of that node's output
tensor) pins which node must be found; a mismatch is an error, not a guess.

Anything else raises :class:`NotFineTunable` with the reason, e.g.
``last op before 'probabilities' is Conv, not Gemm/MatMul``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PASS_THROUGH = ("Identity",)
LINEAR = ("Gemm", "MatMul")
#: elementwise activations a hidden layer may end with (ONNX op -> name)
ACTIVATIONS = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid"}


class NotFineTunable(Exception):
    """The model has no head this package can fine-tune; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Head:
    """Where the head's parameters live in the graph.

    In the head's own terms ``logits = feature @ W + b`` with ``W`` of shape
    (``n_features``, ``n_classes``); :func:`read_head` returns ``W`` and ``b``
    in that orientation whatever the storage (Gemm ``transB``, ``alpha``,
    ``beta``), and :mod:`.export` writes them back the same way.
    """

    node: str                 #: the Gemm/MatMul node (its name, or "<op>:<output>" if unnamed)
    op: str                   #: "Gemm" or "MatMul"
    weight: str               #: initializer holding the weights
    bias: str | None          #: initializer holding the bias (None: the head has none)
    bias_node: str | None     #: the Add node of MatMul+Add (None for Gemm or a bare MatMul)
    feature: str              #: tensor feeding the head, shape (batch, n_features)
    logits: str               #: tensor the head produces (before Softmax)
    output: str               #: the class-score graph output
    activation: str           #: "softmax" or "none": what lies between logits and output
    trans_b: bool             #: Gemm transB=1: the weight is stored (n_classes, n_features)
    alpha: float              #: Gemm alpha (1.0 for MatMul)
    beta: float               #: Gemm beta (1.0 for MatMul+Add)
    n_features: int
    n_classes: int
    dtype: str                #: numpy dtype of the weight initializer ("float32", ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _node_id(node) -> str:
    return node.name or f"{node.op_type}:{node.output[0]}"


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _manifest_dict(manifest: Any) -> dict:
    if manifest is None:
        return {}
    if hasattr(manifest, "model_dump"):
        return manifest.model_dump()
    if isinstance(manifest, Mapping):
        return dict(manifest)
    raise TypeError(f"manifest must be a dict or a Manifest, not {type(manifest).__name__}")


def manifest_output(manifest: Any) -> str | None:
    """The class-score output the manifest names (``postprocess.output``), or None."""
    post = _manifest_dict(manifest).get("postprocess") or {}
    return post.get("output") if isinstance(post, Mapping) else None


def manifest_head(manifest: Any) -> str | None:
    """The head node the manifest pins (``learning.head``), or None."""
    learning = _manifest_dict(manifest).get("learning") or {}
    return learning.get("head") if isinstance(learning, Mapping) else None


def load_model(model) -> Any:
    """An ``onnx.ModelProto`` from a path, bytes or a ModelProto (returned as is)."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(str(model))


class _Graph:
    """Indexes of one graph: who produces and who consumes each tensor."""

    def __init__(self, model) -> None:
        g = model.graph
        self.graph = g
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {out: n for n in g.node for out in n.output if out}
        self.users: dict[str, list] = {}
        for n in g.node:
            for name in n.input:
                if name:
                    self.users.setdefault(name, []).append(n)
        self.outputs = [o.name for o in g.output]
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.by_id = {_node_id(n): n for n in g.node}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          0)

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.inits[name].dims)

    def used_once(self, name: str) -> bool:
        return len(self.users.get(name, [])) == 1


def _find_pinned(g: _Graph, pinned: str):
    node = g.by_id.get(pinned) or g.producer.get(pinned)
    if node is None:
        raise NotFineTunable(f"learning.head {pinned!r} is not a node (or node output) "
                             "of the graph")
    if node.op_type not in LINEAR:
        raise NotFineTunable(f"learning.head {pinned!r} is a {node.op_type} node, "
                             "not Gemm/MatMul")
    return node


def _walk_forward(g: _Graph, node) -> str:
    """From a pinned head node to the graph output it feeds (bias Add, Softmax, Identity)."""
    t = node.output[0]
    for _ in range(len(g.graph.node) + 1):
        if t in g.outputs:
            return t
        users = g.users.get(t, [])
        if len(users) != 1 or users[0].op_type not in ("Add", "Softmax") + PASS_THROUGH:
            break
        t = users[0].output[0]
    raise NotFineTunable(f"learning.head {_node_id(node)!r} does not reach a graph output "
                         "through Add/Softmax/Identity only; name the class-score output "
                         "in postprocess.output")


def find_head(model, manifest: Any = None, output: str | None = None,
              head: str | None = None) -> Head:
    """The fine-tunable head of ``model`` (a path, bytes or ``onnx.ModelProto``).

    ``output`` (else the manifest's ``postprocess.output``, else the first graph
    output) is the class-score output; ``head`` (else the manifest's
    ``learning.head``) pins the node. Raises :class:`NotFineTunable`.
    """
    model = load_model(model)
    g = _Graph(model)
    pinned = head or manifest_head(manifest)
    pinned_node = _find_pinned(g, pinned) if pinned else None
    output = output or manifest_output(manifest)
    if output is None:
        if pinned_node is not None:
            output = _walk_forward(g, pinned_node)
        elif g.outputs:
            output = g.outputs[0]
        else:
            raise NotFineTunable("the graph has no outputs")
    if output not in g.outputs:
        raise NotFineTunable(f"{output!r} is not an output of the graph "
                             f"(outputs: {', '.join(g.outputs)})")

    # walk back from the output through Identity and one Softmax
    t, activation, via = output, "none", []
    while True:
        node = g.producer.get(t)
        if node is None:
            what = "a graph input" if t in g.inputs else "a constant"
            raise NotFineTunable(f"{output!r} is {what}, not computed by a head")
        if node.op_type in PASS_THROUGH:
            via.append(node.op_type)
            t = node.input[0]
            continue
        if node.op_type == "Softmax" and activation == "none":
            axis = _attr(node, "axis", -1 if g.opset >= 13 else 1)
            if axis not in (1, -1):
                raise NotFineTunable(f"the Softmax before {output!r} is over axis {axis}, "
                                     "not the class axis")
            activation = "softmax"
            via.append("Softmax")
            t = node.input[0]
            continue
        break
    through = f" (through {', '.join(reversed(via))})" if via else ""
    logits = t

    layer = _linear(g, node, f"last op before {output!r}", through, "head")
    if pinned_node is not None and g.by_id.get(layer["node"]) is not pinned_node:
        raise NotFineTunable(f"learning.head {pinned!r} is not the head of {output!r}: "
                             f"the last Gemm/MatMul before it is {layer['node']!r}")
    if layer["n_out"] < 2:
        raise NotFineTunable(f"the head {layer['node']!r} has {layer['n_out']} output, "
                             "not classes")
    return Head(node=layer["node"], op=layer["op"], weight=layer["weight"],
                bias=layer["bias"], bias_node=layer["bias_node"], feature=layer["feature"],
                logits=logits, output=output, activation=activation,
                trans_b=layer["trans_b"], alpha=layer["alpha"], beta=layer["beta"],
                n_features=layer["n_in"], n_classes=layer["n_out"], dtype=layer["dtype"])


def _linear(g: _Graph, node, where: str, through: str, what: str) -> dict[str, Any]:
    """The linear layer ending at ``node``: a Gemm, or a
    MatMul optionally followed by a bias Add, with initializer weights; ``where`` and
    ``what`` word the :class:`NotFineTunable` reasons ("last op before 'x'", "head")."""
    bias = bias_node = None
    if node.op_type == "Add":
        a, b = node.input[0], node.input[1]
        if b in g.inits and a not in g.inits:
            lin_out, bias = a, b
        elif a in g.inits and b not in g.inits:
            lin_out, bias = b, a
        else:
            raise NotFineTunable(f"{where} is an Add of two computed "
                                 f"tensors{through}, not a bias Add after Gemm/MatMul")
        bias_node = _node_id(node)
        node = g.producer.get(lin_out)
        if node is None or node.op_type != "MatMul":
            op = node.op_type if node is not None else "a graph input"
            raise NotFineTunable(f"{where} is Add after {op}{through}, "
                                 "not Gemm/MatMul")
        if not g.used_once(lin_out):
            raise NotFineTunable(f"the {what}'s MatMul output {lin_out!r} also feeds other "
                                 "nodes than its bias Add")
    elif node.op_type not in LINEAR:
        raise NotFineTunable(f"{where} is {node.op_type}{through}, "
                             "not Gemm/MatMul")

    node_name = _node_id(node)
    feature, weight = node.input[0], node.input[1]
    trans_b, alpha, beta = False, 1.0, 1.0
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            raise NotFineTunable(f"the {what} {node_name!r} is a Gemm with transA=1")
        trans_b = bool(_attr(node, "transB", 0))
        alpha = float(_attr(node, "alpha", 1.0))
        beta = float(_attr(node, "beta", 1.0))
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if bias not in g.inits:
                raise NotFineTunable(f"the bias {bias!r} of {what} {node_name!r} is "
                                     "computed, not an initializer")
        if alpha == 0.0 or (bias is not None and beta == 0.0):
            raise NotFineTunable(f"the {what} {node_name!r} has alpha or beta 0")
    if weight not in g.inits:
        raise NotFineTunable(f"the weight {weight!r} of {what} {node_name!r} is computed or "
                             "a Constant node, not an initializer")
    if feature in g.inits:
        raise NotFineTunable(f"the {what} {node_name!r} multiplies two constants")
    for name in (weight, bias):
        if name is not None and not g.used_once(name):
            raise NotFineTunable(f"the initializer {name!r} of {what} {node_name!r} is "
                                 "shared with other nodes")
    wshape = g.shape(weight)
    if len(wshape) != 2:
        raise NotFineTunable(f"the weight {weight!r} of {what} {node_name!r} has shape "
                             f"{list(wshape)}, not 2-D")
    n_out, n_in = (wshape if trans_b else wshape[::-1])
    if bias is not None:
        bsize = int(np.prod(g.shape(bias)))
        if bsize != n_out:
            raise NotFineTunable(f"the bias {bias!r} of {what} {node_name!r} has shape "
                                 f"{list(g.shape(bias))}, not one value per output "
                                 f"({n_out})")
    dtype = g.array(weight).dtype
    if dtype.kind != "f":
        raise NotFineTunable(f"the weight {weight!r} of {what} {node_name!r} is {dtype}, "
                             "not floating point")
    return {"node": node_name, "op": node.op_type, "weight": weight, "bias": bias,
            "bias_node": bias_node, "feature": feature, "trans_b": trans_b, "alpha": alpha,
            "beta": beta, "n_in": int(n_in), "n_out": int(n_out), "dtype": str(dtype)}


def find_body(model, head: Head) -> Head:
    """The hidden layer feeding ``head``: a linear layer (Gemm, or MatMul + bias Add)
    whose output reaches ``head.feature`` through one elementwise activation
    (:data:`ACTIVATIONS`) and nothing else::

        x --MatMul(W1)--> --Add(b1)--> --Relu--> head.feature --head-->

    Returned as a :class:`Head` of that layer (``n_classes`` = its units,
    ``logits`` = the tensor before the activation, ``output`` = ``head.feature``,
    ``activation`` = the activation's name in lower case). Raises
    :class:`NotFineTunable` with the reason when the head has no such layer
    before it (e.g. a pooling or reshape in between, as in a CNN)."""
    model = load_model(model)
    g = _Graph(model)
    t = head.feature
    where = f"the op before the head's input {t!r}"
    if not g.used_once(t):
        raise NotFineTunable(f"the head's input {t!r} also feeds other nodes")
    act = g.producer.get(t)
    if act is None:
        raise NotFineTunable(f"the head's input {t!r} is a graph input, no layer before it")
    if act.op_type not in ACTIVATIONS:
        raise NotFineTunable(f"{where} is {act.op_type}, not an activation "
                             f"({'/'.join(ACTIVATIONS)}) after a Gemm/MatMul")
    pre = act.input[0]
    if not g.used_once(pre) or pre in g.outputs:
        raise NotFineTunable(f"the tensor {pre!r} before the {act.op_type} feeds other nodes")
    node = g.producer.get(pre)
    if node is None:
        raise NotFineTunable(f"the {act.op_type} before the head acts on a graph input")
    layer = _linear(g, node, f"the op before {act.op_type} {_node_id(act)!r}",
                    "", "hidden layer")
    if layer["n_out"] != head.n_features:
        raise NotFineTunable(f"the hidden layer {layer['node']!r} has {layer['n_out']} "
                             f"units, the head reads {head.n_features}")
    return Head(node=layer["node"], op=layer["op"], weight=layer["weight"],
                bias=layer["bias"], bias_node=layer["bias_node"], feature=layer["feature"],
                logits=pre, output=t, activation=ACTIVATIONS[act.op_type],
                trans_b=layer["trans_b"], alpha=layer["alpha"], beta=layer["beta"],
                n_features=layer["n_in"], n_classes=layer["n_out"], dtype=layer["dtype"])


def find_layers(model, head: Head, layers: int) -> tuple[list[Head], str | None]:
    """The last ``layers`` (1 or 2) trainable layers ending with ``head``, first
    layer first, and why fewer were found (None when all were)."""
    if layers <= 1:
        return [head], None
    try:
        return [find_body(model, head), head], None
    except NotFineTunable as err:
        return [head], err.reason


def read_head(model, head: Head) -> tuple[np.ndarray, np.ndarray]:
    """The head's current ``(W, b)`` as float64, ``W`` of shape (n_features, n_classes)
    and ``b`` of shape (n_classes,) (zeros when the head has no bias), with Gemm's
    ``alpha``/``beta``/``transB`` applied: ``logits = feature @ W + b``."""
    g = _Graph(load_model(model))
    w = g.array(head.weight).astype(np.float64)
    w = (w.T if head.trans_b else w) * head.alpha
    if head.bias is None:
        b = np.zeros(head.n_classes)
    else:
        b = g.array(head.bias).astype(np.float64).reshape(-1) * head.beta
    return w, b


def load_app(app_dir: Path) -> tuple[dict, Path]:
    """An installed app's manifest (as a dict) and the path of its model file."""
    app_dir = Path(app_dir)
    manifest = json.loads((app_dir / "manifest.json").read_text())
    model = (manifest.get("model") or {}).get("file") or "model.onnx"
    return manifest, app_dir / model


def find_app_head(app_dir: Path, output: str | None = None,
                  head: str | None = None) -> tuple[Head, Path, dict]:
    """:func:`find_head` on an app dir (``manifest.json`` + its model file):
    returns ``(head, model_path, manifest)``."""
    manifest, model_path = load_app(app_dir)
    return find_head(model_path, manifest, output=output, head=head), model_path, manifest
