"""An xarray Dataset on a lat/lon grid with a land mask: an ocean variable
is NaN over land in every time step, a flux variable zero there, and both
are computed with where(): the land pages repeat step after step.

    python examples/xarray_landmask.py [--mib 256]"""
import numpy as np
import xarray as xr
from _common import compare, size_option

mib = size_option(__doc__.splitlines()[0], 256)
nlat, nlon = 360, 720
steps = max(1, mib * (1 << 20) // (2 * nlat * nlon * 8))


def build():
    lat = np.linspace(-89.75, 89.75, nlat)
    lon = np.linspace(-179.75, 179.75, nlon)
    land = (np.abs(lat)[:, None] > 60) | ((lon[None, :] > -20) & (lon[None, :] < 50))   # caps, a continent
    rng = np.random.default_rng(0)
    field = rng.random((steps, nlat, nlon)) + 270.0
    ds = xr.Dataset({"sst": (("time", "lat", "lon"), field)},
                    coords={"time": np.arange(steps), "lat": lat, "lon": lon})
    mask = xr.DataArray(land, dims=("lat", "lon"))
    ds["sst"] = ds.sst.where(~mask)                      # NaN over land
    ds["flux"] = xr.where(mask, 0.0, ds.sst - 271.0)     # zero over land
    return (ds,)


def check(data):
    ds, = data
    assert int(ds.sst.isnull().sum()) > 0 and float(ds.flux.min()) >= -1.0


compare(f"xarray Dataset, {steps} steps of {nlat} x {nlon}, land masked", build, check)
