"""fastconv.preprocess: every kind of input reaches the same MNIST-framed array."""

import io

import numpy as np
import pytest
from conftest import DATA_ROOT
from PIL import Image, ImageDraw, ImageOps

from fastconv import datasets
from fastconv.datasets import MNIST_MEAN, MNIST_STD
from fastconv.preprocess import load_images, to_mnist_input

BACKGROUND = (0 - MNIST_MEAN) / MNIST_STD  # the normalised value of a black pixel


def drawing(mode="RGB", ink=(20, 20, 20), paper=(255, 255, 255)):
    """A digit-like stroke (a 7 with a bar), dark on white, 200 wide x 300 tall, placed off
    centre so that framing has work to do."""
    image = Image.new("RGB", (200, 300), paper)
    pen = ImageDraw.Draw(image)
    pen.line([(30, 40), (130, 40), (70, 200)], fill=ink, width=14, joint="curve")
    pen.line([(60, 120), (120, 120)], fill=ink, width=10)
    return image.convert(mode)


def encode(image, format="PNG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def ink_of(model_input):
    """The [0, 1] ink image back from a normalised model input."""
    return model_input[0] * MNIST_STD + MNIST_MEAN


def assert_mnist_framed(model_input, size=28):
    assert model_input.shape == (1, size, size) and model_input.dtype == np.float32
    ink = ink_of(model_input)
    assert ink.min() > -1e-5 and ink.max() < 1 + 1e-5
    rows = np.flatnonzero((ink > 0.01).any(axis=1))
    cols = np.flatnonzero((ink > 0.01).any(axis=0))
    box = round(size * 20 / 28)
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (box - 1, box), (rows, cols)
    indices = np.arange(size)
    centre = (indices @ ink.sum(axis=1), indices @ ink.sum(axis=0)) / ink.sum()
    assert np.abs(centre - size / 2).max() <= 0.5 + 1e-6, centre  # MNIST's: index 14 of 28


def correlation(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# --- framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_png_drawing_is_framed_like_mnist(mode):
    assert_mnist_framed(to_mnist_input(encode(drawing(mode))))


def test_jpeg_drawing_is_framed_like_the_png():
    from_jpeg = to_mnist_input(encode(drawing(), "JPEG", quality=85))
    assert_mnist_framed(from_jpeg)
    assert correlation(from_jpeg, to_mnist_input(encode(drawing()))) > 0.98


def test_transparent_background_counts_as_paper():
    dark_on_clear = drawing("RGBA")
    dark_on_clear.putalpha(ImageOps.invert(drawing("L")))  # only the ink is opaque
    expected = to_mnist_input(drawing())
    assert correlation(to_mnist_input(encode(dark_on_clear)), expected) > 0.99
    # White strokes on a transparent canvas (a web page's black background shows through).
    light_on_clear = drawing("RGBA", ink=(255, 255, 255), paper=(0, 0, 0))
    light_on_clear.putalpha(ImageOps.invert(drawing("L")))
    assert correlation(to_mnist_input(encode(light_on_clear)), expected) > 0.99


def test_polarity_is_detected_both_ways():
    dark_on_light = to_mnist_input(drawing("L"))
    light_on_dark = to_mnist_input(ImageOps.invert(drawing("L")))
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1e-5)
    assert ink_of(dark_on_light)[0, 0] == pytest.approx(0, abs=1e-6)  # background is black


def test_grey_paper_becomes_black():
    on_grey = to_mnist_input(drawing("L", ink=(40, 40, 40), paper=(190, 190, 190)))
    assert_mnist_framed(on_grey)
    assert correlation(on_grey, to_mnist_input(drawing("L"))) > 0.99
    assert ink_of(on_grey)[0, 0] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("level", [0, 128, 255])
def test_blank_image_gives_the_background(level):
    blank = np.full((50, 40), level, dtype=np.uint8)
    np.testing.assert_allclose(to_mnist_input(blank), np.full((1, 28, 28), BACKGROUND), atol=1e-6)


def test_other_sizes_keep_the_proportions():
    assert_mnist_framed(to_mnist_input(drawing(), size=56), size=56)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display", as phone cameras write it
    contents = encode(drawing(), exif=exif)
    expected = to_mnist_input(drawing().transpose(Image.Transpose.ROTATE_270))
    assert np.array_equal(to_mnist_input(contents), expected)
    assert np.array_equal(to_mnist_input(Image.open(io.BytesIO(contents))), expected)


def test_16_bit_greyscale_png():
    eight_bit = np.asarray(drawing("L"))
    sixteen_bit = Image.fromarray(eight_bit.astype(np.uint16) * 257)
    np.testing.assert_allclose(
        to_mnist_input(encode(sixteen_bit)), to_mnist_input(eight_bit), atol=1e-4
    )


# --- every way in gives the same answer -------------------------------------------------------


@pytest.mark.parametrize(
    "format, mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "RGB")]
)
def test_all_input_kinds_agree(tmp_path, format, mode):
    contents = encode(drawing(mode), format)
    path = tmp_path / f"digit.{format.lower()}"
    path.write_bytes(contents)
    expected = to_mnist_input(contents)
    with open(path, "rb") as stream:
        from_stream = to_mnist_input(stream)
    decoded = Image.open(path)
    for result in [
        to_mnist_input(path),
        to_mnist_input(str(path)),
        to_mnist_input(bytearray(contents)),
        to_mnist_input(io.BytesIO(contents)),
        from_stream,
        to_mnist_input(decoded),
        to_mnist_input(np.asarray(decoded)),
        to_mnist_input(np.asarray(decoded) / 255.0),
    ]:
        np.testing.assert_allclose(result, expected, atol=1e-5)


def test_load_images_stacks_and_names_the_bad_one(tmp_path):
    contents = encode(drawing())
    batch = load_images([contents, np.asarray(drawing("L")), drawing()])
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[1], to_mnist_input(contents), atol=1e-5)
    with pytest.raises(ValueError, match=r"sources\[1\]: image: cannot decode"):
        load_images([contents, b"not an image"])
    assert load_images([]).shape == (0, 1, 28, 28)
    with pytest.raises(TypeError, match="sequence of images"):
        load_images(str(tmp_path / "one.png"))


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "contents",
    [b"definitely not an image", b"", encode(drawing())[:300], encode(drawing(), "JPEG")[:500]],
    ids=["garbage", "empty", "truncated-png", "truncated-jpeg"],
)
def test_undecodable_bytes_are_a_value_error(contents):
    with pytest.raises(ValueError, match=r"^image: cannot decode"):
        to_mnist_input(contents)


def test_path_errors(tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match=f"image: cannot decode {not_an_image}"):
        to_mnist_input(not_an_image)
    with pytest.raises(FileNotFoundError):
        to_mnist_input(tmp_path / "missing.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [40_000, 10_000], ids=["over-limit", "over-twice-limit"])
def test_decompression_bomb_limit_stays_on(monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # the 200x300 drawing has 60,000
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        to_mnist_input(encode(drawing()))


@pytest.mark.parametrize(
    "array, error, message",
    [
        (np.zeros((28, 28, 2), np.uint8), ValueError, r"\(H, W\), \(H, W, 3\) or \(H, W, 4\)"),
        (np.zeros((1, 28, 28, 1), np.uint8), ValueError, r"\(H, W\), \(H, W, 3\) or \(H, W, 4\)"),
        (np.zeros((0, 28), np.uint8), ValueError, "empty"),
        (np.zeros((28, 28), np.int64), TypeError, "uint8 or float"),
        (np.full((28, 28), 255.0), ValueError, r"in \[0, 1\]"),
        (np.full((28, 28), np.nan), ValueError, "finite"),
    ],
)
def test_unsupported_arrays(array, error, message):
    with pytest.raises(error, match=f"image: .*{message}"):
        to_mnist_input(array)


def test_unsupported_type():
    with pytest.raises(TypeError, match="image must be a path, bytes"):
        to_mnist_input([[0, 1], [1, 0]])


# --- real MNIST digits ------------------------------------------------------------------------

REAL_ROOT = DATA_ROOT


@pytest.fixture(scope="module")
def real_test_digits():
    """The raw uint8 test digits and the dataset's normalised images of them."""
    try:
        pixels, _ = datasets.mnist("test", data_dir=REAL_ROOT, download=False, normalize=False)
    except FileNotFoundError:
        pytest.skip(f"no MNIST files under {REAL_ROOT} (set FASTCONV_DATA_DIR)")
    images, _ = datasets.mnist("test", data_dir=REAL_ROOT, download=False)
    return np.rint(pixels[:, 0] * 255).astype(np.uint8), images


def test_real_digits_pass_through_unchanged(real_test_digits):
    """Already-framed 28x28 input keeps its pixels (see _already_framed for why)."""
    raw, dataset = real_test_digits
    prepared = load_images(raw)
    correlations = [correlation(a, b) for a, b in zip(prepared, dataset, strict=True)]
    assert min(correlations) > 0.999
    assert np.abs(prepared - dataset).max() < 0.02  # only the stretch of a 254 peak to 255


def test_real_digits_reframed_from_other_framings(real_test_digits):
    """Scaled up, moved on a larger canvas and inverted, the digits come back as MNIST has them:
    the pass-through is a shortcut to the same answer, not a different rule."""
    raw, dataset = real_test_digits
    correlations = []
    for digit, expected in zip(raw[:500], dataset[:500], strict=True):
        canvas = np.zeros((120, 100), np.uint8)
        canvas[10:94, 5:89] = np.kron(digit, np.ones((3, 3), np.uint8))
        correlations.append(correlation(to_mnist_input(255 - canvas), expected))
    assert np.median(correlations) > 0.99
    assert np.mean(np.array(correlations) > 0.9) > 0.95


def test_real_digit_as_png_bytes(real_test_digits):
    raw, dataset = real_test_digits
    png = encode(Image.fromarray(raw[0]))
    assert correlation(to_mnist_input(png), dataset[0]) > 0.999
