"""fastconv.dask_inference.predict_dask on a LocalCluster of 2 worker processes (1 thread each).

Workers run fastconv single-threaded, so the single-process reference here runs with one thread
and the same batch size: then the probabilities are identical bit for bit (the dense layers' BLAS
product may round differently at another thread count or batch size). Skips without Dask.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("distributed", reason="Dask is not installed (pip install 'fastconv[dask]')")
import dask.array as da  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402
from trained_models import need_mnist, png_bytes, small_model  # noqa: E402

import fastconv  # noqa: E402
from fastconv import dask_inference as distributed  # noqa: E402


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return small_model(tmp_path_factory)


@pytest.fixture(scope="module")
def test_set():
    x, _ = fastconv.datasets.mnist("test", data_dir=need_mnist(), download=False)
    return x


def one_thread_predict(model, x, batch_size):
    """predict_proba in this process as a worker runs it: one thread."""
    before = fastconv.get_num_threads()
    fastconv.set_num_threads(1)
    try:
        return fastconv.train.predict_proba(model, x, batch_size)
    finally:
        fastconv.set_num_threads(before)


def test_mnist_test_set_identical_to_one_process(client, model_path, test_set):
    model = fastconv.io.load_model(model_path).model
    expected = one_thread_predict(model, test_set, 500)
    got = distributed.predict_dask(str(model_path), test_set, client, batch_size=500)
    assert got.shape == (10_000, 10) and got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)
    # The same from a dask.array in other chunks, and from a model object instead of a file.
    lazy = da.from_array(test_set[:2000], chunks=(300, 1, 28, 28))
    np.testing.assert_array_equal(
        distributed.predict_dask(model, lazy, client, batch_size=500), expected[:2000]
    )


def test_the_model_is_built_once_per_worker(client, model_path, test_set):
    before = client.run(lambda: fastconv.dask_inference.models_built)
    for _ in range(2):
        distributed.predict_dask(model_path, test_set[:1000], client, batch_size=100)
    after = client.run(lambda: fastconv.dask_inference.models_built)
    assert all(after[w] - before.get(w, 0) <= 1 for w in after), (before, after)


def _progress(dask_scheduler=None):
    """On the scheduler: (chunks finished, chunks in all, workers holding the model)."""
    chunks = [
        ts for key, ts in dask_scheduler.tasks.items() if str(key).startswith("fastconv-predict-")
    ]
    holders = [
        ws.address
        for key, ts in dask_scheduler.tasks.items()
        if str(key).startswith("fastconv-model-")
        for ws in ts.who_has or ()
    ]
    return sum(ts.state == "memory" for ts in chunks), len(chunks), holders


def test_a_worker_killed_mid_run_changes_nothing(client, model_path, test_set):
    """SIGKILL the worker holding the model once some chunks are done: its chunks (and the
    model, if needed) are computed again elsewhere; the result is complete and identical."""
    model = fastconv.io.load_model(model_path).model
    expected = one_thread_predict(model, test_set, 100)
    pids = client.run(os.getpid)
    finished = threading.Event()
    killed = {}

    def kill_when_under_way():
        try:
            while not finished.is_set():
                done, total, holders = client.run_on_scheduler(_progress)
                if done >= 5 and holders:
                    killed.update(done=done, total=total, worker=holders[0])
                    os.kill(pids[holders[0]], signal.SIGKILL)
                    return
                time.sleep(0.01)
        except Exception as err:  # shown by the assertion below
            killed["error"] = repr(err)

    killer = threading.Thread(target=kill_when_under_way)
    killer.start()
    try:
        got = distributed.predict_dask(model_path, test_set, client, batch_size=100)
    finally:
        finished.set()
        killer.join()
    assert killed and "error" not in killed, f"no worker was killed mid-run: {killed}"
    assert killed["done"] < killed["total"], killed  # it died mid-run
    assert pids[killed["worker"]] not in client.run(os.getpid).values()  # and stayed dead
    np.testing.assert_array_equal(got, expected)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, test_set):
    from trained_models import test_digits

    pixels, _ = test_digits(20)
    folder = tmp_path_factory.mktemp("digits")
    for i, digit in enumerate(pixels):
        (folder / f"{i:02d}.png").write_bytes(png_bytes(digit, scale=2, invert=i % 2 == 1))
    (folder / "zz-broken.png").write_bytes(b"not a png")
    return folder


def test_image_files_and_an_unreadable_one(client, model_path, image_folder):
    model, meta = fastconv.io.load_model(model_path)
    files = sorted(str(p) for p in image_folder.iterdir())
    inputs = np.stack(
        [
            fastconv.preprocess.to_mnist_input(f, mean=meta["mean"], std=meta["std"])
            for f in files[:-1]
        ]
    )
    expected = one_thread_predict(model, inputs, 8)
    result = distributed.predict_files_dask(model_path, image_folder, client, batch_size=8)
    assert list(result.errors) == [20] and "zz-broken.png" in result.errors[20]
    assert np.isnan(result.probabilities[20]).all()
    np.testing.assert_allclose(result.probabilities[:20], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="1 image.*zz-broken.png"):
        distributed.predict_dask(model_path, image_folder, client, batch_size=8)


def test_cli_predict_on_dask_writes_the_same_csv(model_path, image_folder, tmp_path):
    def predict(*options):
        out = tmp_path / f"{len(options)}.csv"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastconv",
                "predict",
                str(model_path),
                str(image_folder),
                "--out",
                str(out),
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 1, result.stderr  # the broken file is an error ...
        assert "zz-broken.png" in result.stderr
        assert "wrote 20 predictions" in result.stdout  # ... the others are written
        with open(out, newline="") as f:
            return list(csv.reader(f))

    plain, on_dask = predict(), predict("--dask", "local:2")
    assert on_dask[0] == plain[0] == ["path", "class", *[str(i) for i in range(10)]]
    assert [row[:2] for row in on_dask] == [row[:2] for row in plain]
    np.testing.assert_allclose(
        np.array([row[2:] for row in on_dask[1:]], dtype=float),
        np.array([row[2:] for row in plain[1:]], dtype=float),
        atol=1e-5,
    )


def test_cli_rejects_a_bad_dask_address(model_path, image_folder):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastconv",
            "predict",
            str(model_path),
            str(image_folder),
            "--dask",
            "local:zero",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "fastconv: error: --dask local:zero: expected local:N with N >= 1 workers"
    ]
