"""A pandas DataFrame as data often comes: a few measured columns, columns
that are all NaN (not recorded) and columns that are all zero (flags never
set). pandas keeps same-dtype columns in one 2-D numpy block.

    python examples/pandas_frame.py [--mib 256]"""
import numpy as np
import pandas as pd
from _common import compare, size_option

mib = size_option(__doc__.splitlines()[0], 256)
columns = 24
rows = mib * (1 << 20) // (columns * 8)


def build():
    rng = np.random.default_rng(0)
    data = {}
    for i in range(columns):
        if i % 3 == 0:
            data[f"measured_{i}"] = rng.random(rows)
        elif i % 3 == 1:
            data[f"missing_{i}"] = np.full(rows, np.nan)
        else:
            data[f"flag_{i}"] = np.zeros(rows)
    frame = pd.DataFrame(data)
    return (frame,)


def check(data):
    frame, = data
    assert frame.filter(like="missing").isna().all().all()
    assert (frame.filter(like="flag") == 0).all().all()


compare(f"pandas DataFrame, {rows:,} rows x {columns} columns (1/3 NaN, 1/3 zero)", build, check)
