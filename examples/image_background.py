"""A stack of camera frames with a common background: scikit-image's
`camera` picture, scaled to the frame size, with a small bright object
moving across it. Rows the object does not cross repeat frame after frame.

    python examples/image_background.py [--mib 256]"""
import numpy as np
from _common import compare, size_option
from skimage import data, transform

mib = size_option(__doc__.splitlines()[0], 256)
height, width = 1024, 2048
nframes = max(2, mib * (1 << 20) // (height * width * 4))


def build():
    background = transform.resize(data.camera(), (height, width)).astype(np.float32)
    stack = np.empty((nframes, height, width), np.float32)
    for i in range(nframes):
        stack[i] = background
        y, x = 100 + 7 * i % (height - 164), 40 * i % (width - 64)
        stack[i, y:y + 64, x:x + 64] = 1.0               # the moving object
    return (stack,)


def check(data):
    stack, = data
    assert stack.shape == (nframes, height, width) and float(stack.max()) == 1.0


compare(f"image stack, {nframes} frames of {height} x {width} float32", build, check)
