"""edge_node.learning on real ONNX files: the head of the digits sample app (an
sklearn MLP converted by skl2onnx), Gemm heads and graphs with no head, features by
ONNX Runtime, the weights written back, and evaluation. No mocks."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_node.learning.evaluate import evaluate, evaluate_app, predict_scores
from edge_node.learning.export import ExportError, check_same_graph, export_head, write_head
from edge_node.learning.features import FeatureExtractor, extract_features
from edge_node.learning.head import NotFineTunable, find_app_head, find_head, read_head
from edge_node.learning.train import head_scores
from tests.models import build_digits_app_dir, digits_manifest, load_test_split


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return build_digits_app_dir(tmp_path_factory.mktemp("digits"))


def _inits(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_the_digits_head_is_the_last_matmul_and_add(app):
    """The sample's manifest names 'probabilities'; the head is MatMul1 + Add1 on the
    hidden ReLU activations, 32 features -> 10 classes, behind Softmax and Identity."""
    head, model_path, _ = find_app_head(app)
    assert (head.node, head.op, head.weight, head.bias, head.bias_node) == \
        ("MatMul1", "MatMul", "coefficient1", "intercepts1", "Add1")
    assert (head.feature, head.output, head.activation) == \
        ("next_activations", "probabilities", "softmax")
    assert (head.n_features, head.n_classes, head.trans_b, head.dtype) == \
        (32, 10, False, "float32")
    W, b = read_head(model_path, head)
    inits = _inits(model_path)
    assert np.array_equal(W, inits["coefficient1"]) and np.array_equal(b, inits["intercepts1"][0])

    # no manifest: the first output is 'label' (an ArgMax/Cast chain), said plainly
    with pytest.raises(NotFineTunable, match="last op before 'label' is Cast, not Gemm/MatMul"):
        find_head(model_path)
    # a pinned head is honoured and checked; the pin alone finds the output
    assert find_head(model_path, head="MatMul1").output == "probabilities"
    with pytest.raises(NotFineTunable, match="'MatMul' is not the head of 'probabilities'"):
        find_head(model_path, digits_manifest(learning={"head": "MatMul"}))
    with pytest.raises(NotFineTunable, match="is a Relu node, not Gemm/MatMul"):
        find_head(model_path, output="probabilities", head="Relu")


def _save(tmp_path, name, nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # a real, loadable model
    return path


def test_models_without_a_head_are_not_fine_tunable(tmp_path):
    """A graph ending in Conv, or in a Mul by a constant, has no head: the error says
    what the last op is."""
    rng = np.random.default_rng(0)
    conv = _save(tmp_path, "conv", [
        helper.make_node("Conv", ["x", "k"], ["scores"], name="conv0", pads=[0, 0, 0, 0]),
    ], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 10, 1, 1])],
        [numpy_helper.from_array(rng.normal(size=(10, 1, 8, 8)).astype(np.float32), "k")])
    with pytest.raises(NotFineTunable, match="last op before 'scores' is Conv, not Gemm/MatMul"):
        find_head(conv, {"postprocess": {"output": "scores"}})

    mul = _save(tmp_path, "mul", [
        helper.make_node("Mul", ["x", "s"], ["m"]),
        helper.make_node("Softmax", ["m"], ["p"]),
    ], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(np.full((1, 10), 2.0, np.float32), "s")])
    with pytest.raises(NotFineTunable) as err:
        find_head(mul)
    assert err.value.reason == "last op before 'p' is Mul (through Softmax), not Gemm/MatMul"


def _gemm_digits(app, tmp_path):
    """The digits MLP rebuilt with Gemm heads: transB=1 weights, alpha 0.5, beta 2."""
    inits = _inits(app / "model.onnx")
    w1, b1 = inits["coefficient"], inits["intercepts"].reshape(-1)
    w2, b2 = inits["coefficient1"], inits["intercepts1"].reshape(-1)
    return _save(tmp_path, "gemm", [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["feat"]),
        helper.make_node("Gemm", ["feat", "w2", "b2"], ["logits"], name="fc2", transB=1,
                         alpha=0.5, beta=2.0),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ], [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [None, 10])],
        [numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1"),
         numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(np.ascontiguousarray((2 * w2).T), "w2"),
         numpy_helper.from_array(b2 / 2, "b2")])


def test_a_gemm_head_with_transb_alpha_beta_reads_and_writes_in_its_own_terms(app, tmp_path):
    """transB, alpha and beta are undone on reading and redone on writing: the same
    W, b as the MatMul model, and a new head lands in the stored orientation."""
    path = _gemm_digits(app, tmp_path)
    head = find_head(path)
    assert (head.node, head.op, head.trans_b, head.alpha, head.beta, head.feature) == \
        ("fc2", "Gemm", True, 0.5, 2.0, "feat")
    W, b = read_head(path, head)
    inits = _inits(app / "model.onnx")
    assert np.allclose(W, inits["coefficient1"], atol=1e-6)
    assert np.allclose(b, inits["intercepts1"].reshape(-1), atol=1e-6)

    X, y = load_test_split(app)
    W_new, b_new = W * 1.5 + 0.01, b - 0.2
    report = export_head(path, head, W_new, b_new, tmp_path / "new.onnx", X[:50])
    assert report["max_abs_diff"] < 1e-5 and report["feature_max_abs_diff"] == 0.0
    assert np.allclose(read_head(tmp_path / "new.onnx", head)[0], W_new, atol=1e-5)
    stored = _inits(tmp_path / "new.onnx")["w2"]
    assert stored.shape == (10, 32) and np.allclose(stored, (W_new / 0.5).T, atol=1e-5)


def test_features_are_the_hidden_activations(app):
    """ORT's exposed feature tensor equals relu(x W1 + b1) from the initializers, in
    batches of any size; with scores, softmax(features W + b) is the model's output."""
    head, model_path, _ = find_app_head(app)
    X, _ = load_test_split(app)
    inits = _inits(model_path)
    expected = np.maximum(X @ inits["coefficient"] + inits["intercepts"], 0)
    F = extract_features(model_path, head, X, batch_size=37)
    assert F.dtype == np.float32 and F.shape == (len(X), 32)
    assert np.allclose(F, expected, atol=1e-4)
    F2, S = FeatureExtractor(model_path, head, with_scores=True)(X)
    W, b = read_head(model_path, head)
    assert np.array_equal(F, F2)
    assert np.abs(head_scores(F2, W, b) - S).max() < 1e-5


def test_exported_model_is_the_same_graph_with_the_new_head(app, tmp_path):
    """Only the two head initializers change; ORT loads the file and its probabilities
    and labels follow numpy's softmax(features W + b); a tampered copy is refused."""
    head, model_path, _ = find_app_head(app)
    X, _ = load_test_split(app)
    W, b = read_head(model_path, head)
    rng = np.random.default_rng(1)
    W_new = W + rng.normal(scale=0.05, size=W.shape)
    b_new = b + rng.normal(scale=0.1, size=b.shape)
    out = tmp_path / "out" / "model.onnx"
    report = export_head(model_path, head, W_new, b_new, out, X[:64])
    assert report["probe_n"] == 64 and report["max_abs_diff"] < 1e-5
    assert report["argmax_agree"] == 1.0

    base, new = _inits(model_path), _inits(out)
    assert set(base) == set(new)
    for name in base:
        changed = not np.array_equal(base[name], new[name])
        assert changed == (name in ("coefficient1", "intercepts1")), name
        assert base[name].shape == new[name].shape and base[name].dtype == new[name].dtype
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["label", "probabilities"]
    label, prob = sess.run(None, {"input": X})
    F = extract_features(model_path, head, X)
    ref = head_scores(F, W_new.astype(np.float32), b_new.astype(np.float32))
    assert np.abs(prob - ref).max() < 1e-5
    assert np.array_equal(label, prob.argmax(axis=1))

    tampered = write_head(model_path, head, W_new, b_new)
    tampered.graph.initializer[0].float_data.append(0.0)
    with pytest.raises(ExportError, match="not a trained layer's"):
        check_same_graph(onnx.load(str(model_path)), tampered, head)


def test_evaluate_accuracy_per_class_and_confusion(app):
    """evaluate() agrees with argmax of ORT's probabilities; per-class counts add up;
    the app dir's manifest picks the 'probabilities' output (not 'label')."""
    X, y = load_test_split(app)
    ev = evaluate_app(app, X, y)
    scores = predict_scores(app / "model.onnx", X, output="probabilities")
    assert ev.output == "probabilities" and ev.n == len(y)
    assert ev.accuracy == pytest.approx(float((scores.argmax(1) == y).mean()))
    assert ev.accuracy > 0.9
    assert sum(r["n"] for r in ev.per_class) == len(y)
    assert sum(r["correct"] for r in ev.per_class) == round(ev.accuracy * len(y))
    conf = np.array(ev.confusion)
    assert conf.shape == (10, 10) and np.trace(conf) == round(ev.accuracy * len(y))
    # without a manifest the first float rank-2 output is used
    assert evaluate(app / "model.onnx", X[:20], y[:20]).output == "probabilities"


def test_the_hidden_layer_before_the_head_is_found_written_and_checked(app, tmp_path):
    """find_body: the digits MLP's MatMul + Add + Relu before its head (and the Gemm
    model's fc1, whose input is the graph input itself); both layers written back
    land where ORT computes exactly numpy's forward pass; a model whose head reads
    something else than an activated linear layer trains its head alone, saying why."""
    from edge_node.learning.export import export_layers, validate_layers
    from edge_node.learning.head import find_body, find_layers
    from edge_node.learning.train import mlp_logits, softmax

    head, model_path, _ = find_app_head(app)
    body = find_body(model_path, head)
    assert (body.node, body.weight, body.bias, body.activation) == \
        ("MatMul", "coefficient", "intercepts", "relu")
    assert (body.feature, body.output, body.n_features, body.n_classes) == \
        ("cast_input", head.feature, 64, 32)

    X, _ = load_test_split(app)
    rng = np.random.default_rng(1)
    (W1, b1), (W2, b2) = read_head(model_path, body), read_head(model_path, head)
    new = [(W1 + rng.normal(0, 0.05, W1.shape), b1 + 0.1),
           (W2 + rng.normal(0, 0.05, W2.shape), b2 - 0.1)]
    out = tmp_path / "deep.onnx"
    report = export_layers(model_path, [(body, *new[0]), (head, *new[1])], out, X[:64])
    assert report["max_abs_diff"] < 1e-5 and report["feature_max_abs_diff"] == 0.0
    prob = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["probabilities"], {"input": X[:100]})[0]
    assert np.abs(prob - softmax(mlp_logits(X[:100], new, "relu"))).max() < 1e-5
    # a tampered hidden layer (not the one validated) is caught by ORT vs numpy
    with pytest.raises(ExportError, match="differs from numpy"):
        validate_layers(out, [(body, W1, b1), (head, *new[1])], X[:64])

    gemm = _gemm_digits(app, tmp_path)
    ghead = find_head(gemm)
    gbody = find_body(gemm, ghead)
    assert (gbody.node, gbody.feature, gbody.trans_b) == ("fc1", "input", True)
    F = FeatureExtractor(gemm, gbody)(X[:5])  # a graph input, passed out as it is
    assert np.array_equal(F, X[:5].astype(np.float32))

    mul = _save(tmp_path, "scaled", [
        helper.make_node("Mul", ["x", "s"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["p"]),
    ], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.full((1, 4), 2.0, np.float32), "s"),
         numpy_helper.from_array(np.ones((4, 3), np.float32), "w")])
    mhead = find_head(mul)
    layers, why = find_layers(mul, mhead, 2)
    assert layers == [mhead] and why == ("the op before the head's input 'f' is Mul, not "
                                         "an activation (Relu/Tanh/Sigmoid) after a Gemm/MatMul")
    assert find_layers(model_path, head, 1) == ([head], None)
