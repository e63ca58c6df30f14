"""The one way an image reaches a model: any input -> a digit framed the way MNIST frames it.

MNIST digits are light ink on black whose bounding box was scaled to fit 20x20 (aspect kept,
antialiased) and then placed in a 28x28 field with the centre of mass at the centre. A model
trained on them expects exactly that, so every image -- a file, uploaded bytes, a stream, a PIL
image or an array -- goes through the same steps here: grey, polarity, crop, scale, centre,
normalise. The CLI, the web server and batch inference all call :func:`to_mnist_input`.
Models of photographs (an ImageNet classifier from ONNX) take :func:`to_photo_input` instead:
resized and centre-cropped to their input size, in colour.

Pillow is imported inside the functions that decode, so importing this module stays cheap.
"""

from __future__ import annotations

import io
import os

import numpy as np

from .datasets import MNIST_MEAN, MNIST_STD

# MNIST's digit box is 20 of 28 pixels; other sizes keep the same proportion.
BOX_FRACTION = 20 / 28
# Pixels brighter than this (after background removal, on a 0..1 scale where the brightest ink
# is 1) count as ink for the bounding box; fainter ones inside the box are kept, outside dropped.
INK_THRESHOLD = 0.1
# An image whose brightest pixel is less than this above its background has no ink: blank.
MIN_CONTRAST = 0.1
# ITU-R 601-2 luma, the weights Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_mnist_input(image, size: int = 28, mean: float = MNIST_MEAN, std: float = MNIST_STD):
    """One image as a float32 ``(1, size, size)`` model input, framed and normalised like MNIST.

    ``image`` is a path (``str`` or ``os.PathLike``), encoded file contents (``bytes``: PNG,
    JPEG, ... ), a binary file-like object, a ``PIL.Image.Image``, or an array ``(H, W)``,
    ``(H, W, 3)`` or ``(H, W, 4)`` of uint8 or of floats in [0, 1]. Dark ink on light paper and
    light ink on dark both work; an image without ink gives the all-background input.

    Raises ``ValueError("image: cannot decode ...")`` for bytes that are not a readable image,
    ``ValueError`` for images over Pillow's decompression-bomb limit, and ``TypeError`` or
    ``ValueError`` for an unsupported type, array shape, dtype or range.
    """
    if not isinstance(size, int) or size < 2:
        raise ValueError(f"size must be an int >= 2, got {size!r}")
    framed = _frame(_as_gray(image), size)
    return ((framed - mean) / std).astype(np.float32)[np.newaxis]


def load_images(sources, size: int = 28, mean: float = MNIST_MEAN, std: float = MNIST_STD):
    """Many images (anything :func:`to_mnist_input` takes) as one float32 ``(N, 1, size, size)``."""
    if isinstance(sources, (str, bytes, bytearray, os.PathLike)):
        raise TypeError("sources must be a sequence of images; for one image use to_mnist_input")
    batch = []
    for index, source in enumerate(sources):
        try:
            batch.append(to_mnist_input(source, size, mean, std))
        except (TypeError, ValueError) as err:
            error_type = TypeError if isinstance(err, TypeError) else ValueError
            raise error_type(f"sources[{index}]: {err}") from err
    if not batch:
        return np.zeros((0, 1, size, size), dtype=np.float32)
    return np.stack(batch)


def _frame(gray, size):
    """A grey [0, 1] image of any size -> light ink on black, size x size, MNIST framing."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 0.5:  # dark ink on light paper (a drawing, a scan): MNIST is the reverse
        gray, background = 1 - gray, 1 - background
    # Grey paper or a dim photo: make the background black and the brightest ink 1, as in MNIST.
    ink = np.clip(gray - background, 0, None)
    peak = float(ink.max())
    canvas = np.zeros((size, size), dtype=np.float32)
    if peak < MIN_CONTRAST:
        return canvas
    ink /= peak

    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    box = round(size * BOX_FRACTION)
    if ink.shape == (size, size) and _already_framed(ink, rows, cols, box):
        return ink  # framing again could only blur (resampling) or shift it by a rounding pixel
    ink = _fit(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], box)

    # Integer shift putting the centre of mass on pixel index size/2 -- where MNIST's digits
    # have theirs (mean 14.0 over the training set) -- clamped so no ink leaves the canvas.
    height, width = ink.shape
    centre_y, centre_x = _centre_of_mass(ink)
    top = min(max(round(size / 2 - centre_y), 0), size - height)
    left = min(max(round(size / 2 - centre_x), 0), size - width)
    canvas[top : top + height, left : left + width] = ink
    return canvas


def _already_framed(ink, rows, cols, box):
    """Is this the fixed point of the framing: the ink's longest side (nearly) ``box`` pixels and
    its centre of mass within a pixel of the centre? True for every MNIST digit (longest side
    18-20 at INK_THRESHOLD, centre of mass within 0.52 px of 14, over both splits)."""
    longest = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    offsets = [abs(centre - ink.shape[0] / 2) for centre in _centre_of_mass(ink)]
    return box - 2 <= longest <= box and max(offsets) <= 1


def _fit(ink, box):
    """Scale so the longest side is ``box`` pixels, aspect kept; Lanczos antialiases shrinking."""
    from PIL import Image

    height, width = ink.shape
    scale = box / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(ink.astype(np.float32)).resize(new_size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized), 0, 1)  # Lanczos rings slightly outside [0, 1]


def _centre_of_mass(ink):
    total = ink.sum()
    rows = np.arange(ink.shape[0]) @ ink.sum(axis=1) / total
    cols = np.arange(ink.shape[1]) @ ink.sum(axis=0) / total
    return float(rows), float(cols)


def to_photo_input(image, shape, mean=0.0, std=1.0):
    """One image as a float32 ``(C, H, W)`` model input for a model trained on photographs
    (ImageNet classifiers): RGB (C = 3) or grey (C = 1), scaled so that it covers H x W (aspect
    kept, bilinear), centre-cropped to H x W, pixels on a 0..1 scale, then ``(x - mean) / std``
    with one value, or one per channel (ImageNet's: ``IMAGENET_MEAN``, ``IMAGENET_STD``).

    ``image`` is anything :func:`to_mnist_input` takes; arrays are uint8 or floats in [0, 1]."""
    channels, height, width = (int(d) for d in shape)
    if channels not in (1, 3) or height < 1 or width < 1:
        raise ValueError(f"shape must be (1 or 3, H, W), got {tuple(shape)}")
    mean, std = (np.asarray(v, np.float32).reshape(-1) for v in (mean, std))
    for name, v in (("mean", mean), ("std", std)):
        if v.size not in (1, channels):
            raise ValueError(f"{name}: one value or {channels} (one per channel), got {v.size}")
    if (std == 0).any():
        raise ValueError("std must not be 0")
    from PIL import Image

    picture = _as_pil(image).convert("RGB" if channels == 3 else "L")
    scale = max(height / picture.height, width / picture.width)
    size = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    if size != picture.size:
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    x = (np.asarray(picture, np.float32) / 255).reshape(height, width, channels).transpose(2, 0, 1)
    return ((x - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


# ImageNet's per-channel (RGB) statistics on the 0..1 scale, what torchvision's models take.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _as_gray(image):
    """Any supported input -> float32 (H, W) in [0, 1]."""
    if isinstance(image, np.ndarray):
        return _gray_from_array(image)
    return _gray_from_pil(_as_pil(image))


def _as_pil(image):
    """A path, bytes, stream, PIL image or array -> a decoded, upright PIL image."""
    from PIL import Image, ImageOps

    if isinstance(image, np.ndarray):
        _gray_from_array(image)  # the same checks: shape, dtype, range
        pixels = image if image.dtype == np.uint8 else np.round(image * 255).astype(np.uint8)
        return Image.fromarray(pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(image), f"{len(image)} bytes")
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:  # a missing file stays a FileNotFoundError
            return _decode(f, os.fspath(image))
    if hasattr(image, "read"):
        return _decode(image, "stream")
    if isinstance(image, Image.Image):  # as if decoded here: upright, as the file would be
        return ImageOps.exif_transpose(image)
    raise TypeError(
        "image must be a path, bytes, a binary file-like object, a PIL.Image or a NumPy array, "
        f"got {type(image).__name__}"
    )


def _decode(stream, what):
    """Decode fully now, so a truncated file fails here with a clear message, not later."""
    from PIL import Image, ImageOps

    limit = Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb guard: we never lift it
    try:
        image = Image.open(stream)
        # Pillow only warns between 1x and 2x the limit; refuse those too, without touching the
        # process-wide warning filters (this runs in a threaded web server).
        too_big = limit is not None and image.width * image.height > limit
        if not too_big:
            image.load()
            image = ImageOps.exif_transpose(image)  # phone photos are stored sideways
    except Image.DecompressionBombError:
        too_big = True
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ValueError(f"image: cannot decode {what}: {err}") from err
    if too_big:
        raise ValueError(
            f"image: {what} exceeds Pillow's decompression-bomb limit of {limit} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS)"
        )
    return image


def _gray_from_pil(image):
    if image.mode.startswith("I"):  # 16-bit greyscale (PNG, TIFF): full scale is 65535
        return _gray_from_array(np.clip(np.asarray(image, dtype=np.float32) / 65535, 0, 1))
    if image.mode == "F":
        return _gray_from_array(np.asarray(image))
    has_alpha = image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info
    mode = "RGBA" if has_alpha else "L" if image.mode in ("1", "L") else "RGB"
    return _gray_from_array(np.asarray(image.convert(mode)))


def _gray_from_array(array):
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"image: expected an array (H, W), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image: empty array of shape {array.shape}")
    if array.dtype == np.uint8:
        pixels = array.astype(np.float32) / 255
    elif np.issubdtype(array.dtype, np.floating):
        pixels = array.astype(np.float32)
        if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
            raise ValueError(
                f"image: float pixels must be finite and in [0, 1], "
                f"got values in [{pixels.min()}, {pixels.max()}] (uint8 data: pass it as uint8)"
            )
    else:
        raise TypeError(f"image: expected uint8 or float pixels in [0, 1], got dtype {array.dtype}")
    if pixels.ndim == 2:
        return pixels
    gray = pixels[..., :3] @ _LUMA
    if pixels.shape[2] == 4:
        alpha = pixels[..., 3]
        # Transparent pixels are paper: white behind dark ink (a drawing), but black behind light
        # ink (a canvas drawn white-on-transparent), else the ink would vanish into the paper.
        ink_level = (gray * alpha).sum() / max(alpha.sum(), 1e-6)
        paper = 0.0 if ink_level > 0.5 else 1.0
        gray = gray * alpha + paper * (1 - alpha)
    return gray
