"""Runs on a dask.distributed cluster (a LocalCluster here) equal the local runs."""
import os

import numpy as np
import pytest

distributed = pytest.importorskip("dask.distributed")  # the optional dask extra

import pipeline_helpers as ph  # noqa: E402
import step_helpers as h  # noqa: E402
from jwst_wiimatch.matching import match_models  # noqa: E402
from jwst_wiimatch.models import WiiMatchLibrary  # noqa: E402
from jwst_wiimatch.step import WiiMatchStep  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def cal_asn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dask_cal")
    models = [ph.make_cal(k, shape=(256, 256)) for k in range(4)]
    return h.write_asn(models, str(folder))


def test_sky_matching_on_cluster_equals_local(cluster, cal_asn, caplog):
    local, _ = match_models(WiiMatchLibrary(cal_asn), kind="sky", degree=1, binning=2)
    with distributed.Client(cluster.scheduler_address) as client, \
            caplog.at_level("INFO", logger="jwst_wiimatch"):
        remote, _ = match_models(WiiMatchLibrary(cal_asn), kind="sky", degree=1, binning=2,
                                 client=client)
    # the reading ran as tasks on the workers
    assert "4 models to read on the dask cluster" in caplog.text
    for a, b in zip(local, remote):
        np.testing.assert_allclose(b.coefficients, a.coefficients, rtol=1e-10, atol=1e-13)


def test_step_with_scheduler_equals_local_run(cluster, tmp_path):
    models, _, _ = h.make_models(n=4, degree=1)
    asn = h.write_asn(models, str(tmp_path / "in"))
    outs = {}
    for how, kw in (("local", {}), ("dask", {"scheduler": cluster.scheduler_address})):
        out_dir = tmp_path / how
        WiiMatchStep.call(asn, degree=1, subtract=True, save_results=True,
                          output_dir=str(out_dir), **kw)
        outs[how] = sorted(os.listdir(out_dir))
    assert outs["local"] == outs["dask"] and len(outs["local"]) == 4
    from stdatamodels.jwst import datamodels

    for name in outs["local"]:
        with datamodels.open(tmp_path / "local" / name) as a, \
                datamodels.open(tmp_path / "dask" / name) as b:
            ca = a.meta.background.polynomial_info[-1].instance["coefficients"]
            cb = b.meta.background.polynomial_info[-1].instance["coefficients"]
            np.testing.assert_allclose(cb, ca, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(b.data, a.data, rtol=1e-6, atol=1e-7)
            assert b.meta.background.subtracted is True


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    models, _, _ = h.make_models(n=2, degree=0)
    asn = h.write_asn(models, str(tmp_path))
    with pytest.raises(ValueError, match="cannot connect to the dask scheduler"):
        WiiMatchStep.call(asn, scheduler="tcp://127.0.0.1:1")


@pytest.mark.parametrize("world", [False, True])
def test_engine_pair_sums_on_cluster_equal_local(cluster, world):
    """The engine's blocks as dask tasks: same sums, added in the same order."""
    from jwst_wiimatch.core import match_backgrounds

    rng = np.random.default_rng(4)
    shape = (300, 420)
    ims, masks = [], []
    for k in range(4):
        m = np.zeros(shape, bool)
        m[30 * k:30 * k + 200, 50 * k:50 * k + 250] = True
        ims.append(rng.normal(k, 1.0, shape).astype(np.float32))
        masks.append(m)

    def image2world(x, y):
        return 10 + 1e-3 * x + 1e-8 * x * y, -3 + 1e-3 * y

    kw = dict(degree=2, image2world=image2world if world else None)
    local = match_backgrounds(ims, masks, **kw)
    with distributed.Client(cluster.scheduler_address) as client:
        remote = match_backgrounds(ims, masks, client=client, **kw)
    np.testing.assert_allclose(remote.coef, local.coef, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(remote.pair_npix, local.pair_npix)
    # robust matching: its passes run on the cluster too, with the same rejections
    ims[1][100:104, 100:300] += 40.0
    local = match_backgrounds(ims, masks, robust="clip", **kw)
    with distributed.Client(cluster.scheduler_address) as client:
        remote = match_backgrounds(ims, masks, client=client, robust="clip", **kw)
    np.testing.assert_allclose(remote.coef, local.coef, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(remote.pair_rejected, local.pair_rejected)
    assert local.rejected[1] >= 4 * 200
