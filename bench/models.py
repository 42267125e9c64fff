"""The benchmark models: MobileNetV2-, ResNet-18- and SqueezeNet-1.1-shaped ONNX nets.

Built layer by layer with ``onnx.helper`` (no torch, no network), with the
published layer shapes, so the parameter counts match the papers and the
torchvision reference implementations (3,504,872 / 11,689,512 / 1,235,496;
BatchNorm counts its scale and bias, as torchvision does, not its running
statistics). Weights are random (He-initialised, seeded), which is all a speed
benchmark needs. Input ``input`` float32 ``[N, 3, 224, 224]`` with a dynamic
batch; output ``logits`` ``[N, 1000]``.

Files go to ``bench/out/`` (gitignored), named with a hash of this generator's
source, so they are built once and rebuilt whenever this file changes. The
digits sample app (``appstore.samples.digits``) is built there too.

    .venv/bin/python bench/models.py          # build (or reuse) and print a table
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OUT = Path(__file__).resolve().parent / "out"
OPSET = 17
IMAGE_SHAPE = (3, 224, 224)
#: published parameter counts (torchvision), to check the generator against
PUBLISHED = {"mobilenetv2": 3_504_872, "resnet18": 11_689_512, "squeezenet1_1": 1_235_496}


class _Graph:
    """A tiny NCHW graph builder that counts parameters as torchvision does."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params = 0
        self._n = 0

    def _name(self, kind: str) -> str:
        self._n += 1
        return f"{kind}{self._n}"

    def _init(self, name: str, arr: np.ndarray, trainable: bool = True) -> str:
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        self.params += arr.size if trainable else 0
        return name

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1,
             groups: int = 1, bias: bool = False) -> str:
        name = self._name("conv")
        fan_in = cin // groups * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)
        ins = [x, self._init(name + ".w", w)]
        if bias:
            ins.append(self._init(name + ".b", np.zeros(cout)))
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride],
                       pads=[k // 2] * 4, group=groups)

    def bn(self, x: str, c: int, gamma: float = 1.0) -> str:
        name = self._name("bn")
        ins = [x, self._init(name + ".scale", np.full(c, gamma)),
               self._init(name + ".bias", np.zeros(c)),
               self._init(name + ".mean", np.zeros(c), trainable=False),
               self._init(name + ".var", np.ones(c), trainable=False)]
        return self.op("BatchNormalization", ins, epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def relu6(self, x: str) -> str:
        if not any(t.name == "relu6.min" for t in self.inits):
            self._init("relu6.min", np.array(0.0), trainable=False)
            self._init("relu6.max", np.array(6.0), trainable=False)
        return self.op("Clip", [x, "relu6.min", "relu6.max"])

    def maxpool(self, x: str, k: int, stride: int, pad: int = 0, ceil: bool = False) -> str:
        return self.op("MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride],
                       pads=[pad] * 4, ceil_mode=int(ceil))

    def head(self, x: str, cin: int, classes: int = 1000) -> str:
        """Global average pool, flatten, fully connected -> logits."""
        x = self.op("Flatten", [self.op("GlobalAveragePool", [x])])
        name = self._name("fc")
        w = self.rng.standard_normal((cin, classes)) * np.sqrt(1.0 / cin)
        return self.op("Gemm", [x, self._init(name + ".w", w),
                                self._init(name + ".b", np.zeros(classes))])

    def model(self, name: str, out: str) -> onnx.ModelProto:
        assert self.nodes[-1].output[0] == out, "the last node makes the output"
        self.nodes[-1].output[0] = "logits"
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *IMAGE_SHAPE])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
            self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="aidc-bench")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def resnet18(seed: int = 18) -> tuple[onnx.ModelProto, int]:
    """ResNet-18 (He et al. 2016): BasicBlocks [2, 2, 2, 2], 64..512 channels."""
    g = _Graph(seed)
    x = g.maxpool(g.relu(g.bn(g.conv("input", 3, 64, 7, 2), 64)), 3, 2, 1)
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            y = g.relu(g.bn(g.conv(x, cin, cout, 3, s), cout))
            y = g.bn(g.conv(y, cout, cout, 3), cout, gamma=0.5)
            short = x if (s == 1 and cin == cout) else g.bn(g.conv(x, cin, cout, 1, s), cout)
            x, cin = g.relu(g.op("Add", [y, short])), cout
    out = g.head(x, 512)
    return g.model("resnet18", out), g.params


def mobilenetv2(seed: int = 2) -> tuple[onnx.ModelProto, int]:
    """MobileNetV2 (Sandler et al. 2018), width 1.0: inverted residuals, ReLU6."""
    g = _Graph(seed)
    x = g.relu6(g.bn(g.conv("input", 3, 32, 3, 2), 32))
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride, hidden = (s if i == 0 else 1), cin * t
            y = x if t == 1 else g.relu6(g.bn(g.conv(x, cin, hidden, 1), hidden))
            y = g.relu6(g.bn(g.conv(y, hidden, hidden, 3, stride, groups=hidden), hidden))
            y = g.bn(g.conv(y, hidden, c, 1), c, gamma=0.5)
            x = g.op("Add", [x, y]) if (stride == 1 and cin == c) else y
            cin = c
    x = g.relu6(g.bn(g.conv(x, cin, 1280, 1), 1280))
    out = g.head(x, 1280)
    return g.model("mobilenetv2", out), g.params


def squeezenet1_1(seed: int = 11) -> tuple[onnx.ModelProto, int]:
    """SqueezeNet 1.1 (Iandola et al. 2016): Fire modules, conv classifier, no BN."""
    g = _Graph(seed)

    def fire(x: str, cin: int, sq: int, e1: int, e3: int) -> str:
        s = g.relu(g.conv(x, cin, sq, 1, bias=True))
        return g.op("Concat", [g.relu(g.conv(s, sq, e1, 1, bias=True)),
                               g.relu(g.conv(s, sq, e3, 3, bias=True))], axis=1)

    # torchvision: 3x3 stride-2 conv with no padding, then ceil-mode max pools
    name = g._name("conv")
    w = g.rng.standard_normal((64, 3, 3, 3)) * np.sqrt(2.0 / 27)
    x = g.op("Conv", ["input", g._init(name + ".w", w), g._init(name + ".b", np.zeros(64))],
             kernel_shape=[3, 3], strides=[2, 2])
    x = g.maxpool(g.relu(x), 3, 2, ceil=True)
    x = fire(fire(x, 64, 16, 64, 64), 128, 16, 64, 64)
    x = g.maxpool(x, 3, 2, ceil=True)
    x = fire(fire(x, 128, 32, 128, 128), 256, 32, 128, 128)
    x = g.maxpool(x, 3, 2, ceil=True)
    for cin, sq, e in ((256, 48, 192), (384, 48, 192), (384, 64, 256), (512, 64, 256)):
        x = fire(x, cin, sq, e, e)
    x = g.relu(g.conv(x, 512, 1000, 1, bias=True))
    out = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    return g.model("squeezenet1_1", out), g.params


GENERATORS = {"mobilenetv2": mobilenetv2, "resnet18": resnet18, "squeezenet1_1": squeezenet1_1}
IMAGE_MODELS = tuple(GENERATORS)
ALL_MODELS = (*IMAGE_MODELS, "digits")


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    params: int
    input_name: str
    input_shape: tuple[int, ...]  # one sample, batch of 1

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def generator_hash() -> str:
    """Changes when this file (the generator) or the onnx version changes."""
    src = Path(__file__).read_bytes() + onnx.__version__.encode()
    return hashlib.sha256(src).hexdigest()[:12]


def _count_params(path: Path) -> int:
    m = onnx.load(str(path))
    skip = (".mean", ".var", ".min", ".max")
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if not t.name.endswith(skip))


def build(name: str, out: Path = OUT) -> BenchModel:
    """Build one benchmark model into ``out`` (or reuse the cached file)."""
    out.mkdir(parents=True, exist_ok=True)
    if name == "digits":
        from appstore.samples.digits import build_digits_sample
        d = out / f"digits-{generator_hash()}"  # the sample's own build is deterministic
        if not (d / "model.onnx").exists():
            build_digits_sample(d)
        path = d / "model.onnx"
        return BenchModel(name, path, _count_params(path), "input", (1, 64))
    path = out / f"{name}-{generator_hash()}.onnx"
    if path.exists():
        params = _count_params(path)
    else:
        model, params = GENERATORS[name]()
        tmp = path.with_suffix(".tmp")
        onnx.save(model, str(tmp))
        tmp.replace(path)
    return BenchModel(name, path, params, "input", (1, *IMAGE_SHAPE))


def sample_input(model: BenchModel, seed: int = 0) -> np.ndarray:
    """A fixed random input of one sample (values like normalised pixels)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(model.input_shape).astype(np.float32)
    if model.name == "digits":
        x = rng.integers(0, 17, model.input_shape).astype(np.float32)
    return x


def main() -> None:
    print(f"{'model':<14} {'params':>12} {'published':>12} {'file bytes':>12}  path")
    for name in ALL_MODELS:
        m = build(name)
        pub = f"{PUBLISHED[name]:,}" if name in PUBLISHED else "-"
        print(f"{name:<14} {m.params:>12,} {pub:>12} {m.size_bytes:>12,}  "
              f"{m.path.relative_to(OUT.parents[1])}")


if __name__ == "__main__":
    main()
