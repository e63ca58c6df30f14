"""The old home of data-parallel training and Dask inference, kept so existing imports work.

Data-parallel training over MPI lives in :mod:`fastconv.data_parallel`, batch inference on Dask
in :mod:`fastconv.dask_inference`.
"""

from .dask_inference import FilePredictions, dask_client, predict_dask, predict_files_dask
from .data_parallel import (
    DataParallel,
    ReplicasDiverged,
    abort_on_error,
    average_buffers,
    average_gradients,
    check_replicas,
    default_threads,
    get_comm,
    rank_and_size,
    shard,
    weights_checksum,
)

__all__ = [
    "DataParallel",
    "FilePredictions",
    "ReplicasDiverged",
    "abort_on_error",
    "average_buffers",
    "average_gradients",
    "check_replicas",
    "dask_client",
    "default_threads",
    "get_comm",
    "predict_dask",
    "predict_files_dask",
    "rank_and_size",
    "shard",
    "weights_checksum",
]
