"""A scipy.sparse matrix made dense (toarray), then copied and scaled, as
dense code over sparse data does: mostly zero pages, and copies.

    python examples/sparse_densified.py [--mib 256]"""
import numpy as np
import scipy.sparse
from _common import compare, size_option

mib = size_option(__doc__.splitlines()[0], 256)
n = int((mib * (1 << 20) / 3 / 8) ** 0.5)          # three n x n float64 matrices


def build():
    a = scipy.sparse.random(n, n, density=1e-4, format="csr", random_state=0).toarray()
    b = a.copy()                                    # a working copy, untouched
    c = np.abs(a * 2.0)                             # written in full, mostly zeros
    return a, b, c


def check(data):
    a, b, c = data
    assert np.array_equal(a, b) and np.array_equal(c, np.abs(a * 2.0))


compare(f"scipy.sparse {n} x {n}, density 1e-4, densified and copied", build, check)
