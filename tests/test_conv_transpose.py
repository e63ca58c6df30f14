"""conv_transpose2d, its backward, the reference and nn.ConvTranspose2d: against torch, against a
scalar loop written from the definition, and the refusals.

The torch tests run where torch is importable (CI installs torch==2.13.0 CPU); the rest always.
"""

import re

import numpy as np
import pytest
from conftest import _as_pair, _int_or_pair, assert_close, dtypes, random_array
from hypothesis import given, settings
from hypothesis import strategies as st

import fastconv as fc
from fastconv import io, nn
from fastconv import reference as ref

EXAMPLES = 50
# torch's float32 kernels sum in another order than our BLAS does (as tests/test_torch_parity.py)
TORCH_RTOL = {np.dtype(np.float32): 3e-5, np.dtype(np.float64): 1e-12}


def output_size(size, kernel, stride, padding, output_padding, dilation):
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


@st.composite
def transpose_cases(draw, max_batch: int = 3, max_channels: int = 3):
    """(x, weight, bias) and the keyword arguments of a valid conv_transpose2d call: any stride,
    padding, output_padding (below stride or dilation), dilation, groups, batched or not."""
    dtype = draw(dtypes)
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, max_channels))
    c_out = groups * draw(st.integers(1, max_channels))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = _int_or_pair(draw, st.integers(1, 3))
    dilation = _int_or_pair(draw, st.integers(1, 3))
    padding = _int_or_pair(draw, st.integers(0, 2))
    s, d, p = _as_pair(stride), _as_pair(dilation), _as_pair(padding)
    extra = tuple(draw(st.integers(0, max(s[k], d[k]) - 1)) for k in range(2))
    output_padding = extra[0] if extra[0] == extra[1] and draw(st.booleans()) else extra
    sizes = []
    for k in range(2):
        # the smallest input whose output has at least one row
        size = 1
        while output_size(size, kernel[k], s[k], p[k], extra[k], d[k]) < 1:
            size += 1
        sizes.append(size + draw(st.integers(0, 3)))
    seed = draw(st.integers(0, 2**32 - 1))
    unbatched = draw(st.booleans())
    shape = (c_in, *sizes) if unbatched else (draw(st.integers(0, max_batch)), c_in, *sizes)
    x = random_array(seed, shape, dtype)
    weight = random_array(seed + 1, (c_in, c_out // groups, *kernel), dtype)
    bias = random_array(seed + 2, (c_out,), dtype) if draw(st.booleans()) else None
    kwargs = dict(
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )
    return x, weight, bias, kwargs


def naive_conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation):
    """The definition, one multiply-add at a time: input pixel (h, w) of channel c adds
    weight[c, o, i, j] * x to output (h * stride - padding + i * dilation, ...) of channel
    group * C_out/groups + o, where it falls inside the output."""
    (sh, sw), (ph, pw), (eh, ew), (dh, dw) = map(
        _as_pair, (stride, padding, output_padding, dilation)
    )
    n, c_in, h, w = x.shape
    _, per_group, kh, kw = weight.shape
    out_h = output_size(h, kh, sh, ph, eh, dh)
    out_w = output_size(w, kw, sw, pw, ew, dw)
    out = np.zeros((n, per_group * groups, out_h, out_w), dtype=np.float64)
    for b in range(n):
        for c in range(c_in):
            group = c // (c_in // groups)
            for o in range(per_group):
                for y in range(h):
                    for z in range(w):
                        for i in range(kh):
                            for j in range(kw):
                                r, q = y * sh - ph + i * dh, z * sw - pw + j * dw
                                if 0 <= r < out_h and 0 <= q < out_w:
                                    out[b, group * per_group + o, r, q] += (
                                        weight[c, o, i, j] * x[b, c, y, z]
                                    )
    if bias is not None:
        out += bias[None, :, None, None]
    return out


# --- the reference against the definition, the compiled path against the reference ----------

NAMED = {
    "plain": dict(),
    "stride 2, output_padding 1": dict(stride=2, padding=1, output_padding=1),
    "asymmetric": dict(stride=(3, 1), padding=(2, 0), output_padding=(2, 0), dilation=(1, 2)),
    # output_padding >= stride, allowed because dilation is larger: the conv2d it is the adjoint
    # of has more outputs than the input has rows
    "output_padding >= stride": dict(stride=1, dilation=3, output_padding=2, padding=1),
    "groups": dict(groups=2, stride=2, output_padding=(1, 0)),
    "padding crops beyond the kernel": dict(padding=2, stride=2, output_padding=1),
}


@pytest.mark.parametrize("case", NAMED)
def test_reference_follows_the_definition(case):
    kwargs = {**dict(stride=1, padding=0, output_padding=0, groups=1, dilation=1), **NAMED[case]}
    x = random_array(0, (2, 4, 3, 4), np.float64)
    weight = random_array(1, (4, 3, 3, 2), np.float64)
    bias = random_array(2, (3 * kwargs["groups"],), np.float64)
    expected = naive_conv_transpose2d(x, weight, bias, **kwargs)
    assert_close(ref.conv_transpose2d(x, weight, bias, **kwargs), expected)
    assert_close(fc.conv_transpose2d(x, weight, bias, **kwargs), expected)


@settings(max_examples=EXAMPLES)
@given(transpose_cases(max_batch=2, max_channels=2))
def test_reference_backward_is_the_forwards_adjoint(case):
    """<conv_transpose2d(x, w), g> = <x, grad_input(g)> = <w, grad_weight(g)>, both exactly
    linear, so the reference's backward is checked by its forward."""
    x, weight, _, kwargs = case
    x, weight = x.astype(np.float64), weight.astype(np.float64)
    out = ref.conv_transpose2d(x, weight, **kwargs)
    grad = random_array(9, out.shape, np.float64)
    grad_x, grad_w, grad_b = ref.conv_transpose2d_backward(grad, x, weight, **kwargs)
    total = np.vdot(out, grad)
    scale = max(1.0, np.abs(out).sum() * np.abs(grad).max(initial=0))
    assert abs(np.vdot(x, grad_x) - total) <= 1e-12 * scale
    assert abs(np.vdot(weight, grad_w) - total) <= 1e-12 * scale
    assert_close(grad_b, grad.sum(axis=tuple(k for k in range(grad.ndim) if k != grad.ndim - 3)))


@settings(max_examples=EXAMPLES)
@given(transpose_cases())
def test_matches_the_reference(case):
    x, weight, bias, kwargs = case
    expected = ref.conv_transpose2d(x, weight, bias, **kwargs)
    assert_close(fc.conv_transpose2d(x, weight, bias, **kwargs), expected, what="output")
    grad = random_array(7, expected.shape, x.dtype)
    got = fc.conv_transpose2d_backward(grad, x, weight, **kwargs)
    for name, a, e in zip(
        ("grad_input", "grad_weight", "grad_bias"),
        got,
        ref.conv_transpose2d_backward(grad, x, weight, **kwargs),
    ):
        assert_close(a, e, what=name)


@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
def test_both_conv_algorithms_give_the_reference(algorithm):
    """3x3, stride 1, float32, 32 channels: the shape conv2d's Winograd path takes."""
    x = random_array(0, (2, 32, 7, 6), np.float32)
    weight = random_array(1, (32, 24, 3, 3), np.float32)
    before = fc.get_conv_algorithm()
    fc.set_conv_algorithm(algorithm)
    try:
        out = fc.conv_transpose2d(x, weight, padding=1)
        grad = random_array(2, out.shape, np.float32)
        got = fc.conv_transpose2d_backward(grad, x, weight, padding=1)
    finally:
        fc.set_conv_algorithm(before)
    truth = [
        a.astype(np.float32)
        for a in ref.conv_transpose2d_backward(
            grad.astype(np.float64), x.astype(np.float64), weight.astype(np.float64), padding=1
        )
    ]
    expected = ref.conv_transpose2d(x.astype(np.float64), weight.astype(np.float64), padding=1)
    assert_close(out, expected.astype(np.float32), rtol=1e-4)
    for a, e in zip(got, truth):
        assert_close(a, e, rtol=1e-4)


def test_output_mask_skips_gradients():
    x, weight = random_array(0, (2, 3, 4, 4), np.float64), random_array(1, (3, 2, 3, 3), np.float64)
    grad = random_array(2, (2, 2, 9, 9), np.float64)
    full = fc.conv_transpose2d_backward(grad, x, weight, stride=2)
    for mask in [(False, True, True), (True, False, False), (False, False, True)]:
        got = fc.conv_transpose2d_backward(grad, x, weight, stride=2, output_mask=mask)
        for wanted, a, e in zip(mask, got, full):
            if wanted:
                assert_close(a, e)
            else:
                assert a is None


# --- refusals: each names the argument ---------------------------------------------------------


def _x(*shape, dtype=np.float64):
    return random_array(0, shape, dtype)


INVALID = {
    # case: (args, kwargs, exception, regex the message must match: the argument and the rule)
    "output_padding = stride": (
        (_x(1, 2, 5, 5), _x(2, 3, 3, 3)),
        dict(stride=2, output_padding=(0, 2)),
        ValueError,
        r"output_padding.*smaller than either stride or dilation",
    ),
    "output_padding > stride and dilation": (
        (_x(1, 2, 5, 5), _x(2, 3, 3, 3)),
        dict(stride=2, dilation=2, output_padding=2),
        ValueError,
        r"output_padding.*smaller than either stride or dilation",
    ),
    "negative output_padding": (
        (_x(1, 2, 5, 5), _x(2, 3, 3, 3)),
        dict(output_padding=-1),
        ValueError,
        r"output_padding",
    ),
    "channel mismatch": (
        (_x(1, 3, 5, 5), _x(2, 3, 3, 3)),
        {},
        ValueError,
        r"^input: expected 2 channels",
    ),
    "groups not dividing C_in": (
        (_x(1, 4, 5, 5), _x(4, 3, 3, 3)),
        dict(groups=3),
        ValueError,
        r"^groups:.*divisible by groups=3",
    ),
    "groups 0": ((_x(1, 2, 5, 5), _x(2, 3, 3, 3)), dict(groups=0), ValueError, r"^groups"),
    "groups a float": ((_x(1, 2, 5, 5), _x(2, 3, 3, 3)), dict(groups=1.5), TypeError, r"^groups"),
    "negative padding": (
        (_x(1, 2, 5, 5), _x(2, 3, 3, 3)),
        dict(padding=-1),
        ValueError,
        r"^padding",
    ),
    "padding a string": (
        (_x(1, 2, 5, 5), _x(2, 3, 3, 3)),
        dict(padding="same"),
        TypeError,
        r"^padding",
    ),
    "stride 0": ((_x(1, 2, 5, 5), _x(2, 3, 3, 3)), dict(stride=0), ValueError, r"^stride"),
    "dilation 0": ((_x(1, 2, 5, 5), _x(2, 3, 3, 3)), dict(dilation=0), ValueError, r"^dilation"),
    "output too small": (
        (_x(1, 2, 1, 1), _x(2, 3, 2, 2)),
        dict(padding=1),
        ValueError,
        r"^input:.*\(0 x 0\) is too small",
    ),
    "2-D input": ((_x(5, 5), _x(2, 3, 3, 3)), {}, ValueError, r"^input: expected a 3-D.*4-D"),
    "3-D weight": ((_x(1, 2, 5, 5), _x(2, 3, 3)), {}, ValueError, r"^weight: expected a 4-D"),
    "empty weight": ((_x(1, 2, 5, 5), _x(2, 0, 3, 3)), {}, ValueError, r"^weight"),
    "bias of C_in": (
        (_x(1, 2, 5, 5), _x(2, 3, 3, 3), _x(2)),
        {},
        ValueError,
        r"^bias: expected shape \(3,\)",
    ),
    "float32 weight, float64 input": (
        (_x(1, 2, 5, 5), _x(2, 3, 3, 3, dtype=np.float32)),
        {},
        TypeError,
        r"^weight: dtype float32",
    ),
    "integer input": (
        (np.ones((1, 2, 5, 5), np.int64), _x(2, 3, 3, 3)),
        {},
        TypeError,
        r"^input: expected a float32 or float64",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_bad_arguments_raise_naming_the_argument(case):
    args, kwargs, error, message = INVALID[case]
    for fn in (fc.conv_transpose2d, ref.conv_transpose2d):
        with pytest.raises(error, match=message):
            fn(*args, **kwargs)
    if len(args) == 2:  # the backward checks the same arguments first
        with pytest.raises(error, match=message):
            fc.conv_transpose2d_backward(np.zeros((1, 3, 7, 7)), *args, **kwargs)


@pytest.mark.parametrize("shape", [(1, 3, 7, 6), (3, 7, 7), (2, 3, 7, 7)])
def test_backward_refuses_a_grad_output_of_another_shape(shape):
    x, weight = _x(1, 2, 5, 5), _x(2, 3, 3, 3)  # output (1, 3, 7, 7)
    with pytest.raises(ValueError, match=r"^grad_output: expected shape \(1, 3, 7, 7\)"):
        fc.conv_transpose2d_backward(np.zeros(shape), x, weight)


# --- torch ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip(
        "torch", reason="torch not installed: parity with torch.nn.functional not checked"
    )


def tensor(torch, a, grad=False):
    return torch.from_numpy(np.array(a, copy=True)).requires_grad_(grad)


def close_to_torch(actual, expected_tensor, what):
    expected = expected_tensor.detach().numpy()
    assert_close(actual, expected, rtol=TORCH_RTOL[expected.dtype], what=what)


@settings(max_examples=EXAMPLES)
@given(transpose_cases())
def test_matches_torch_forward_and_gradients(torch, case):
    x, weight, bias, kwargs = case
    tx, tw = tensor(torch, x, True), tensor(torch, weight, True)
    tb = None if bias is None else tensor(torch, bias, True)
    out = torch.nn.functional.conv_transpose2d(tx, tw, tb, **kwargs)
    close_to_torch(fc.conv_transpose2d(x, weight, bias, **kwargs), out, "output")
    grad = random_array(5, tuple(out.shape), x.dtype)
    out.backward(tensor(torch, grad))
    grad_x, grad_w, grad_b = fc.conv_transpose2d_backward(grad, x, weight, **kwargs)
    close_to_torch(grad_x, tx.grad, "grad_input")
    close_to_torch(grad_w, tw.grad, "grad_weight")
    if tb is not None:
        close_to_torch(grad_b, tb.grad, "grad_bias")


def test_takes_torchs_keyword_names(torch):
    x, weight, bias = _x(2, 4, 5, 6), _x(4, 3, 3, 2), _x(6)
    kwargs = dict(stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    expected = torch.nn.functional.conv_transpose2d(
        input=tensor(torch, x), weight=tensor(torch, weight), bias=tensor(torch, bias), **kwargs
    )
    close_to_torch(fc.conv_transpose2d(input=x, weight=weight, bias=bias, **kwargs), expected, "")
    # and positionally, in torch's order: bias, stride, padding, output_padding, groups, dilation
    close_to_torch(fc.conv_transpose2d(x, weight, bias, 2, 1, 1, 2, 1), expected, "positional")


@pytest.mark.parametrize("case", INVALID)
def test_torch_refuses_the_same_configurations(torch, case):
    """Each refusal above is one torch makes too: no valid call is refused."""
    args, kwargs, _, _ = INVALID[case]
    targs = [tensor(torch, a) for a in args]
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        torch.nn.functional.conv_transpose2d(*targs, **kwargs)


LAYERS = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "strided": dict(
        in_channels=4, out_channels=2, kernel_size=(3, 2), stride=2, padding=1, output_padding=1
    ),
    "grouped, dilated, no bias": dict(
        in_channels=4, out_channels=6, kernel_size=2, groups=2, dilation=2, bias=False
    ),
}


@pytest.mark.parametrize("case", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_with_torchs_state_dict_gives_torchs_output_and_gradients(torch, case, dtype):
    kwargs = LAYERS[case]
    torch.manual_seed(0)
    theirs = torch.nn.ConvTranspose2d(**kwargs).to(getattr(torch, np.dtype(dtype).name))
    ours = nn.ConvTranspose2d(**kwargs, dtype=dtype)
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }
    ours.load_state_dict(state)
    x = random_array(1, (2, kwargs["in_channels"], 5, 4), dtype)
    tx = tensor(torch, x, True)
    expected = theirs(tx)
    close_to_torch(ours(x), expected, "output")
    grad = random_array(2, tuple(expected.shape), dtype)
    expected.backward(tensor(torch, grad))
    close_to_torch(ours.backward(grad), tx.grad, "grad_input")
    close_to_torch(ours.weight.grad, theirs.weight.grad, "weight.grad")
    if theirs.bias is not None:
        close_to_torch(ours.bias.grad, theirs.bias.grad, "bias.grad")
    assert repr(ours) == repr(theirs)


def test_layer_initialisation_has_torchs_bounds(torch):
    """torch: kaiming-uniform with a = sqrt(5) over fan-in weight.shape[1] * kH * kW, so every
    value lies within 1 / sqrt(C_out / groups * kH * kW), weight and bias alike."""
    ours = nn.ConvTranspose2d(6, 8, (3, 2), groups=2, rng=0)
    bound = 1 / np.sqrt(4 * 3 * 2)
    for param in (ours.weight.data, ours.bias.data):
        assert np.abs(param).max() <= bound
        assert np.abs(param).max() > 0.8 * bound  # spread over the interval, not a smaller one
    theirs = torch.nn.ConvTranspose2d(6, 8, (3, 2), groups=2)
    assert ours.weight.shape == tuple(theirs.weight.shape) == (6, 4, 3, 2)
    assert np.abs(theirs.weight.detach().numpy()).max() <= bound


# --- the layer in models: config, files, training -----------------------------------------


def test_layer_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"ConvTranspose2d: .*divisible by groups=2"):
        nn.ConvTranspose2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"padding_mode"):
        nn.ConvTranspose2d(3, 4, 3, padding_mode="reflect")
    layer = nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"^output_padding"):
        layer(_x(1, 3, 4, 4, dtype=np.float32))


def _decoder(dtype=np.float32):
    return nn.Sequential(
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, dtype=dtype, rng=1),
        nn.ReLU(),
        nn.ConvTranspose2d(3, 2, (2, 3), groups=1, dilation=(1, 2), bias=False, dtype=dtype, rng=2),
        nn.Flatten(),
        nn.Linear(2 * 9 * 12, 5, dtype=dtype, rng=3),
    )


def test_config_round_trip_and_model_file(tmp_path):
    model = _decoder()
    rebuilt = nn.from_config(nn.to_config(model))
    assert nn.to_config(rebuilt) == nn.to_config(model)
    assert repr(rebuilt) == repr(model)
    path = tmp_path / "decoder.npz"
    io.save_model(model, path, {"input_shape": [2, 4, 4]})
    loaded, meta = io.load_model(path)
    x = random_array(4, (3, 2, 4, 4), np.float32)
    model.eval()
    assert np.array_equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        assert np.array_equal(loaded.state_dict()[key], value), key


def test_a_model_with_it_trains():
    """The gradients reach every parameter: a few steps of SGD lower a regression loss."""
    model = _decoder(np.float64)
    x = random_array(5, (8, 2, 4, 4), np.float64)
    target = random_array(6, (8, 5), np.float64)
    optimizer = fc.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(20):
        out = model(x)
        losses.append(float(((out - target) ** 2).mean()))
        model.zero_grad()
        model.backward(2 * (out - target) / out.size)
        optimizer.step()
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0], losses


def test_message_names_the_layer_input_channels():
    layer = nn.ConvTranspose2d(3, 4, 3)
    with pytest.raises(ValueError, match=re.escape("input: expected 3 channels")):
        layer(_x(1, 2, 5, 5, dtype=np.float32))
