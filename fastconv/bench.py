"""Benchmark cases, shared by `pytest benchmarks/` and `fastconv bench`.

Every case builds, for one backend ("fastconv", "reference", "torch" or "onnxruntime"), a
zero-argument callable that runs the operation once on prepared inputs: the timing loop only
ever calls that. Speeds are reported against the sgemm ceiling that NumPy's BLAS reaches on this
machine, measured here. onnxruntime runs the whole-model inference cases only, from the ONNX
file fastconv.onnx.save writes of the same model.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import _args, nn, optim, reference
from . import functional as F
from . import onnx as fc_onnx
from .threads import get_num_threads, set_num_threads

BACKENDS = ("fastconv", "reference", "torch", "onnxruntime")


@dataclass(frozen=True)
class Case:
    operation: str  # e.g. "conv forward"
    shape: str  # shown in tables
    flops: float  # floating-point operations per call (0: not a FLOP-bound operation)
    make: Callable[[str], Callable[[], object] | None]  # backend -> runner, None if unsupported
    algorithm: Callable[[], str] | None = None  # the convolution algorithm(s) fastconv runs


def _rng():
    return np.random.default_rng(0)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _conv_algorithm(x, w, stride, padding, tiles: bool = True) -> str:
    """conv2d_algorithm's name; tiles: "winograd F(4x4)" where the forward runs 4x4 tiles (the
    weight gradient stays on F(2x2))."""
    g = _args.conv_args(x, w, stride, padding, 1, 1).geometry
    algorithm = F.conv2d_algorithm(g, w.shape[0], 1, w.dtype)
    args = (g.pad_top, g.pad_left, g.out_h, g.out_w)
    if tiles and algorithm == "winograd" and F._winograd4_pays(args):
        return "winograd F(4x4)"
    return algorithm


# --- convolution -------------------------------------------------------------------------------

CONV_LAYERS = [
    # (N, C_in, H, C_out, k, stride, padding)
    (64, 32, 14, 64, 3, 1, 1),
    (64, 1, 28, 32, 3, 1, 1),
    (64, 64, 32, 64, 3, 1, 1),
    (64, 32, 28, 64, 3, 2, 1),
    (64, 6, 14, 16, 5, 1, 0),
]


def _conv_case(layer, part):
    n, c, size, c_out, k, stride, pad = layer
    out = (size + 2 * pad - k) // stride + 1
    forward_flops = 2.0 * n * c_out * out * out * c * k * k
    shape = f"x({n},{c},{size},{size}) w({c_out},{c},{k},{k}) s{stride} p{pad}"
    rng = _rng()
    x = rng.standard_normal((n, c, size, size), dtype=np.float32)
    w = rng.standard_normal((c_out, c, k, k), dtype=np.float32) * 0.1
    b = rng.standard_normal(c_out, dtype=np.float32)
    grad = rng.standard_normal((n, c_out, out, out), dtype=np.float32)

    def make(backend):
        if backend == "onnxruntime":  # runs whole models only
            return None
        if backend in ("fastconv", "reference"):
            f = F if backend == "fastconv" else reference
            forward = lambda: f.conv2d(x, w, b, stride, pad)  # noqa: E731
            backward = lambda: f.conv2d_backward(grad, x, w, stride, pad)  # noqa: E731
        else:
            torch = _torch()
            if torch is None:
                return None
            tx, tw, tb, tg = (torch.from_numpy(a) for a in (x, w, b, grad))

            def forward():
                with torch.no_grad():
                    return torch.nn.functional.conv2d(tx, tw, tb, stride, pad)

            def backward():
                return torch.ops.aten.convolution_backward(
                    tg,
                    tx,
                    tw,
                    [c_out],
                    [stride] * 2,
                    [pad] * 2,
                    [1, 1],
                    False,
                    [0, 0],
                    1,
                    [True, True, True],
                )

        if part == "forward":
            return forward
        if part == "backward":
            return backward
        return lambda: (forward(), backward())

    flops = {"forward": forward_flops, "backward": 2 * forward_flops}.get(part, 3 * forward_flops)
    return Case(f"conv {part}", shape, flops, make, lambda: _conv_algorithm(x, w, stride, pad))


# --- pooling, unfold/fold ----------------------------------------------------------------------


def _pool_case(kind, part):
    x = _rng().standard_normal((64, 32, 28, 28), dtype=np.float32)
    grad = _rng().standard_normal((64, 32, 14, 14), dtype=np.float32)
    _, indices = F.max_pool2d(x, 2, return_indices=True)

    def make(backend):
        if backend == "onnxruntime":  # runs whole models only
            return None
        if backend in ("fastconv", "reference"):
            f = F if backend == "fastconv" else reference
            if kind == "max":
                forward = lambda: f.max_pool2d(x, 2, return_indices=True)  # noqa: E731
                backward = lambda: f.max_pool2d_backward(grad, x, 2, indices=indices)  # noqa: E731
            else:
                forward = lambda: f.avg_pool2d(x, 2)  # noqa: E731
                backward = lambda: f.avg_pool2d_backward(grad, x, 2)  # noqa: E731
        else:
            torch = _torch()
            if torch is None:
                return None
            tx, tg, ti = torch.from_numpy(x), torch.from_numpy(grad), torch.from_numpy(indices)
            aten = torch.ops.aten
            if kind == "max":
                forward = lambda: aten.max_pool2d_with_indices(tx, [2, 2], [2, 2])  # noqa: E731
                backward = lambda: aten.max_pool2d_with_indices_backward(  # noqa: E731
                    tg, tx, [2, 2], [2, 2], [0, 0], [1, 1], False, ti
                )
            else:
                forward = lambda: aten.avg_pool2d(tx, [2, 2], [2, 2])  # noqa: E731
                backward = lambda: aten.avg_pool2d_backward(  # noqa: E731
                    tg, tx, [2, 2], [2, 2], [0, 0], False, True, None
                )
        return {"forward": forward, "backward": backward}.get(part, lambda: (forward(), backward()))

    return Case(f"{kind} pool {part}", "x(64,32,28,28) 2x2/2", 0.0, make)


def _unfold_case(kind):
    x = _rng().standard_normal((64, 32, 14, 14), dtype=np.float32)
    cols = F.unfold(x, 3, padding=1)

    def make(backend):
        if backend == "torch":
            torch = _torch()
            if torch is None:
                return None
            tx, tc = torch.from_numpy(x), torch.from_numpy(cols)
            if kind == "unfold":
                return lambda: torch.nn.functional.unfold(tx, 3, padding=1)
            return lambda: torch.nn.functional.fold(tc, (14, 14), 3, padding=1)
        if backend == "onnxruntime":
            return None
        f = F if backend == "fastconv" else reference
        if kind == "unfold":
            return lambda: f.unfold(x, 3, padding=1)
        return lambda: f.fold(cols, (14, 14), 3, padding=1)

    return Case(kind, "x(64,32,14,14) 3x3 p1", 0.0, make)


# --- the LeNet-class model -----------------------------------------------------------------------


def lenet_flops(batch: int) -> float:
    """Forward + backward multiply-adds of the LeNet-class model (conv1 needs no input grad)."""
    conv1 = 2.0 * batch * 32 * 28 * 28 * 9
    conv2 = 2.0 * batch * 64 * 14 * 14 * 32 * 9
    dense = 2.0 * batch * (3136 * 128 + 128 * 10)
    return 3 * (conv2 + dense) + 2 * conv1


def fastconv_lenet(seed: int = 0):
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, rng=seed),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, rng=seed + 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3136, 128, rng=seed + 2),
        nn.ReLU(),
        nn.Linear(128, 10, rng=seed + 3),
    )


def torch_lenet(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3136, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def fastconv_lenet5(seed: int = 0):
    """LeNet-5 as benchmarks/onnx_parity.py trains it in torch: 5x5 convs, 6 and 16 channels."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2, rng=seed),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, rng=seed + 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120, rng=seed + 2),
        nn.ReLU(),
        nn.Linear(120, 84, rng=seed + 3),
        nn.ReLU(),
        nn.Linear(84, 10, rng=seed + 4),
    )


def torch_lenet5(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


MODELS = {"LeNet": (fastconv_lenet, torch_lenet), "LeNet-5": (fastconv_lenet5, torch_lenet5)}


def _model_algorithms(model, x) -> str:
    """The algorithm of each Conv2d, in order, on the shapes x gives them (e.g. direct+winograd);
    no tile size: a convolution fused with its pooling runs F(2x2) whatever its shape."""
    found = []
    with nn.no_grad():
        for layer in model.layers:
            if isinstance(layer, nn.Conv2d):
                found.append(
                    _conv_algorithm(x, layer.weight.data, layer.stride, layer.padding, False)
                )
            x = layer(x)
    return "+".join(found)


def _onnxruntime_session(model):
    """An onnxruntime session of fastconv's own ONNX export of `model`, on fastconv's threads."""
    onnxruntime = _onnxruntime()
    if onnxruntime is None:
        return None
    buffer = io.BytesIO()
    fc_onnx.save(model, buffer, input_shape=(1, 28, 28))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(
        buffer.getvalue(), options, providers=["CPUExecutionProvider"]
    )


def _model_case(name, batch, part):
    rng = _rng()
    x = rng.standard_normal((batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, batch)
    build_fastconv, build_torch = MODELS[name]

    def make(backend):
        if backend == "reference":
            return None
        if backend in ("fastconv", "onnxruntime"):
            model = build_fastconv()
            if part == "inference":
                model.eval()
                if backend == "onnxruntime":
                    session = _onnxruntime_session(model)
                    if session is None:
                        return None
                    feed = {session.get_inputs()[0].name: x}
                    return lambda: session.run(None, feed)

                def infer():
                    with nn.no_grad():
                        return model(x)

                return infer
            if backend == "onnxruntime":
                return None
            criterion = nn.CrossEntropyLoss()
            optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step():
                criterion(model(x), y)
                model.zero_grad()
                model.backward(criterion.backward())
                optimizer.step()

            return step
        torch = _torch()
        if torch is None:
            return None
        model = build_torch(torch)  # fastconv's weights: the two compute the same logits
        model.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in build_fastconv().state_dict().items()}
        )
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        if part == "inference":
            model.eval()

            def infer():
                with torch.no_grad():
                    return model(tx)

            return infer
        criterion = torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def torch_step():
            loss = criterion(model(tx), ty)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return torch_step

    flops = 0.0
    if name == "LeNet":
        flops = lenet_flops(batch) if part == "train step" else lenet_flops(batch) / 3
    return Case(
        f"{name} {part}",
        f"batch {batch}",
        flops,
        make,
        lambda: _model_algorithms(build_fastconv(), x[:1]),
    )


def cases() -> list[Case]:
    """Every benchmarked case, in table order."""
    found = []
    for layer in CONV_LAYERS:
        found += [_conv_case(layer, part) for part in ("forward", "backward", "forward+backward")]
    for kind in ("max", "avg"):
        found += [_pool_case(kind, part) for part in ("forward", "backward", "forward+backward")]
    found += [_unfold_case("unfold"), _unfold_case("fold")]
    found += [
        _model_case("LeNet", 64, "train step"),
        _model_case("LeNet", 256, "train step"),
        _model_case("LeNet", 64, "inference"),
        _model_case("LeNet", 256, "inference"),
        _model_case("LeNet-5", 256, "inference"),
    ]
    return found


# --- checking --------------------------------------------------------------------------------


def _arrays(result):
    """The arrays of a runner's result, in order (torch tensors as NumPy, None dropped)."""
    items = result if isinstance(result, (tuple, list)) else (result,)
    found = []
    for item in items:
        if isinstance(item, (tuple, list)):
            found += _arrays(item)
        elif item is not None:
            found.append(np.asarray(item.detach() if hasattr(item, "detach") else item))
    return found


def _lenet_reference(batch):
    """bench's LeNet (same seeds, same input) run by fastconv.reference, layer by layer."""
    model = fastconv_lenet()
    model.eval()
    p = [layer for layer in model if hasattr(layer, "weight")]
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
    for conv in p[:2]:
        x = reference.conv2d(x, conv.weight.data, conv.bias.data, padding=1)
        x = reference.max_pool2d(np.maximum(x, 0), 2)
    x = np.maximum(x.reshape(batch, -1) @ p[2].weight.data.T + p[2].bias.data, 0)
    return x @ p[3].weight.data.T + p[3].bias.data


def check(case: Case, runner: Callable[[], object]) -> None:
    """Raise AssertionError unless runner() gives the reference's arrays (LeNet: its logits; a training step
    returns nothing to compare and is checked through the inference case of the same model)."""
    got = _arrays(runner())
    if case.operation == "LeNet inference":
        expected = [_lenet_reference(int(case.shape.split()[-1]))]
    elif case.operation.startswith("LeNet"):
        return
    else:
        reference_runner = case.make("reference")
        assert reference_runner is not None  # every case but the models (returned above) has one
        expected = _arrays(reference_runner())
    if len(got) != len(expected):
        raise AssertionError(
            f"{case.operation}: {len(got)} results, the reference gives {len(expected)}"
        )
    for k, (a, e) in enumerate(zip(got, expected)):
        if a.shape != e.shape:
            raise AssertionError(f"{case.operation}, result {k}: shape {a.shape} != {e.shape}")
        scale = max(float(np.abs(e).max()), 1.0) if e.size else 1.0
        tol = 1e-4 * scale if e.dtype.kind == "f" else 0
        np.testing.assert_allclose(a, e, rtol=0, atol=tol, err_msg=f"{case.operation}, result {k}")


# --- measuring -------------------------------------------------------------------------------


def time_call(run: Callable[[], object], budget: float = 0.3, min_runs: int = 5) -> float:
    """Median seconds of warm calls (after warm-up calls that fault in every buffer)."""
    for _ in range(2):
        run()
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return statistics.median(times)


def sgemm_ceiling(budget: float = 0.5) -> float:
    """GFLOP/s of NumPy's float32 matmul on the skinny shape im2col produces (64x288 @ 288x12544)."""
    rng = _rng()
    a = rng.standard_normal((64, 288), dtype=np.float32)
    b = rng.standard_normal((288, 12544), dtype=np.float32)
    out = np.empty((64, 12544), dtype=np.float32)
    seconds = time_call(lambda: np.matmul(a, b, out=out), budget)
    return 2.0 * 64 * 288 * 12544 / seconds / 1e9


def run(threads: int | None = None, budget: float = 0.3, backends=BACKENDS, selected=None):
    """Time every case on every backend; returns (rows, sgemm ceiling GFLOP/s)."""

    torch = _torch() if "torch" in backends else None
    if threads is not None:
        set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads or get_num_threads(), user_api="blas"):
        ceiling = sgemm_ceiling()  # BLAS at full width, whatever the kernels leave it at
    rows = []
    for case in cases():
        if selected and not any(s in case.operation for s in selected):
            continue
        row: dict[str, str | float | None] = {
            "operation": case.operation,
            "shape": case.shape,
            "algorithm": case.algorithm() if case.algorithm else None,
        }
        # One engine at a time, onnxruntime last: its pool spins after each run and would slow
        # whatever ran next.
        ms: dict[str, float | None] = {}
        for backend in backends:
            runner = case.make(backend)
            if runner is not None and backend != "reference":
                check(case, runner)  # a fast wrong kernel is a failure, not a speed-up
            ms[backend] = None if runner is None else time_call(runner, budget) * 1e3
            row[f"{backend}_ms"] = ms[backend]
        ours, ref, other, ort = (ms.get(b) for b in BACKENDS)
        gflops = case.flops / (ours * 1e6) if case.flops and ours else None
        row["speedup_vs_reference"] = ref / ours if ref and ours else None
        row["speedup_vs_torch"] = other / ours if other and ours else None
        row["speedup_vs_onnxruntime"] = ort / ours if ort and ours else None
        row["gflops"] = gflops
        row["ceiling_share"] = gflops / ceiling if gflops else None
        rows.append(row)
    return rows, ceiling


def format_table(rows, ceiling: float) -> str:
    def cell(value, fmt):
        return "—" if value is None else format(value, fmt)

    header = (
        "operation",
        "shape",
        "algorithm",
        "fastconv ms",
        "reference ms",
        "torch ms",
        "onnxruntime ms",
        "vs ref",
        "vs torch",
        "vs ort",
        "GFLOP/s",
        "of sgemm",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["operation"],
                r["shape"],
                r.get("algorithm") or "",
                cell(r["fastconv_ms"], ".3f"),
                cell(r.get("reference_ms"), ".3f"),
                cell(r.get("torch_ms"), ".3f"),
                cell(r.get("onnxruntime_ms"), ".3f"),
                cell(r["speedup_vs_reference"], ".1f") + ("x" if r["speedup_vs_reference"] else ""),
                cell(r["speedup_vs_torch"], ".2f") + ("x" if r["speedup_vs_torch"] else ""),
                cell(r.get("speedup_vs_onnxruntime"), ".2f")
                + ("x" if r.get("speedup_vs_onnxruntime") else ""),
                cell(r["gflops"], ".0f"),
                cell(r["ceiling_share"] and 100 * r["ceiling_share"], ".0f")
                + ("%" if r["ceiling_share"] else ""),
            )
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            str(v).ljust(w) if i < 3 else str(v).rjust(w)
            for i, (v, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]
    text.insert(1, "-" * len(text[0]))
    text.append(f"sgemm ceiling (NumPy float32 matmul 64x288 @ 288x12544): {ceiling:.0f} GFLOP/s")
    return "\n".join(text)
