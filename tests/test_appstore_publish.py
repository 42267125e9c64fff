"""Publishing: the digits sample, manifest-vs-model checks, signing keys."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from appstore.errors import PackageRejected, SigningKeyError
from appstore.publish import build_package
from appstore.signing import SigningKey, trusted_keys
from cloud_sync.package import read_package
from tests.appstore_support import digits_dir, digits_package  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)


def _manifest(digits: Path) -> dict:
    return json.loads((digits / "manifest.json").read_text())


def test_digits_sample_package_verifies_and_classifies(digits_dir: Path, tmp_path: Path) -> None:
    """The sample every demo starts from must be a real, accurate, verifiable app:
    a node that downloads it gets >90 % right on digits it never saw."""
    key = SigningKey.generate()
    sha, size = digits_package(digits_dir, key, tmp_path / "d.zip")
    assert size == (tmp_path / "d.zip").stat().st_size
    pkg = read_package(tmp_path / "d.zip", {key.key_id: key.public_raw}, expected_sha256=sha)
    assert pkg.manifest.name == "digits" and pkg.manifest.task == "classification"
    assert pkg.labels == [str(i) for i in range(10)]
    assert pkg.manifest.preprocess.layout == "flat"
    sess = ort.InferenceSession(pkg.model_bytes, providers=["CPUExecutionProvider"])
    held = np.load(digits_dir / "heldout.npz")
    probs = sess.run(["probabilities"], {"input": held["X_test"]})[0]
    assert probs.shape == (len(held["y_test"]), 10)
    assert (probs.argmax(1) == held["y_test"]).mean() > 0.9
    # deterministic: the same inputs give the same address
    assert digits_package(digits_dir, key, tmp_path / "again.zip")[0] == sha


def _third_party_model(path: Path) -> None:
    """A model nobody wrote a manifest for: y = relu(x @ W), symbolic batch."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 4])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, 2])
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 2], np.ones(8, np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "W"], ["mm"]),
         helper.make_node("Relu", ["mm"], ["features"])],
        "third_party", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_any_onnx_model_packages_as_generic_with_name_version_task(tmp_path: Path) -> None:
    """A publisher with a third-party ONNX model writes no code and no tensor list:
    the tensors are read from the model itself."""
    _third_party_model(tmp_path / "m.onnx")
    key = SigningKey.generate()
    manifest = {"name": "feat", "version": "0.1.0", "task": "generic"}
    sha, _ = build_package(tmp_path / "m.onnx", manifest, None, key, tmp_path / "p.zip")
    pkg = read_package(tmp_path / "p.zip", {key.key_id: key.public_raw}, expected_sha256=sha)
    [inp], [out] = pkg.manifest.model.inputs, pkg.manifest.model.outputs
    assert (inp.name, inp.dtype, inp.shape) == ("pixels", "float32", ["batch", 3, 4])
    assert (out.name, out.dtype, out.shape) == ("features", "float32", ["batch", 3, 2])
    assert manifest == {"name": "feat", "version": "0.1.0", "task": "generic"}  # not mutated


def test_manifest_that_lies_about_the_model_is_refused_with_every_mismatch(
        digits_dir: Path, tmp_path: Path) -> None:
    """A wrong manifest would fail on every node after rollout; the publisher must
    hear all of what is wrong at once, before anything is signed."""
    m = _manifest(digits_dir)
    m["model"]["inputs"] = [{"name": "input", "dtype": "float64", "shape": [None, 63]},
                            {"name": "image", "dtype": "float32", "shape": [1, 64]}]
    m["model"]["outputs"][1]["shape"] = [None, 10, 1]
    with pytest.raises(PackageRejected) as err:
        build_package(digits_dir / "model.onnx", m, None, SigningKey.generate(), tmp_path / "x.zip")
    assert err.value.reason == "tensor_mismatch"
    detail = err.value.detail
    assert "input 'input': dtype float64 in manifest, float32 in model" in detail
    assert "input 'input': dim 1 is 63 in manifest, 64 in model" in detail
    assert "input 'image' is not a model input" in detail
    assert "output 'probabilities': rank 3" in detail
    assert not (tmp_path / "x.zip").exists()


def test_symbolic_dims_match_anything_but_model_inputs_must_be_described(
        digits_dir: Path, tmp_path: Path) -> None:
    """A fixed batch of 1 in the manifest is fine for a model with a free batch,
    but leaving out an input the model needs is not."""
    m = _manifest(digits_dir)
    m["model"]["inputs"][0]["shape"] = [1, 64]
    build_package(digits_dir / "model.onnx", m, None, SigningKey.generate(), tmp_path / "ok.zip")
    _third_party_model(tmp_path / "m.onnx")
    m2 = {"name": "feat", "version": "0.1.0",
          "model": {"inputs": [{"name": "other", "dtype": "float32"}],
                    "outputs": [{"name": "features", "dtype": "float32"}]}}
    with pytest.raises(PackageRejected, match="model input 'pixels' is not described"):
        build_package(tmp_path / "m.onnx", m2, None, SigningKey.generate(), tmp_path / "x.zip")


def test_labels_must_match_the_classifier_size(digits_dir: Path, tmp_path: Path) -> None:
    """Nine labels for ten classes would mislabel every '9' in the field."""
    (tmp_path / "labels.txt").write_text("\n".join(str(i) for i in range(9)))
    with pytest.raises(PackageRejected, match="9 labels for a classifier with 10 outputs"):
        build_package(digits_dir / "model.onnx", _manifest(digits_dir), tmp_path / "labels.txt",
                      SigningKey.generate(), tmp_path / "x.zip")


def test_not_a_model_and_bad_manifest_say_why(digits_dir: Path, tmp_path: Path) -> None:
    """A wrong file or a bad version string is named, not a stack trace."""
    (tmp_path / "junk.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(PackageRejected) as err:
        build_package(tmp_path / "junk.onnx", {"name": "x", "version": "1.0.0"}, None,
                      SigningKey.generate(), tmp_path / "x.zip")
    assert err.value.reason == "bad_model"
    m = _manifest(digits_dir)
    m["version"] = "1.0"
    with pytest.raises(PackageRejected) as err:
        build_package(digits_dir / "model.onnx", m, None, SigningKey.generate(), tmp_path / "x.zip")
    assert err.value.reason == "bad_manifest" and "semver" in err.value.detail


def test_signing_key_is_private_and_trusted_keys_come_from_the_folder(tmp_path: Path) -> None:
    """The private key must not be world-readable; other publishers are trusted by
    dropping their .pub in keys/trusted, and a broken .pub is skipped, not fatal."""
    path = tmp_path / "keys" / "publisher.pem"
    key = SigningKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = SigningKey.load_or_create(path)
    assert again.key_id == key.key_id and again.sign(b"x") == key.sign(b"x")
    other = SigningKey.generate()
    trusted = tmp_path / "keys" / "trusted"
    trusted.mkdir()
    (trusted / "other.pub").write_bytes(other.public_pem())
    (trusted / "hex.pub").write_text(SigningKey.generate().public_raw.hex())
    (trusted / "broken.pub").write_text("garbage")
    keys = trusted_keys(key, trusted)
    assert len(keys) == 3 and keys[other.key_id] == other.public_raw
    (tmp_path / "notakey.pem").write_text("nope")
    with pytest.raises(SigningKeyError):
        SigningKey.load(tmp_path / "notakey.pem")
