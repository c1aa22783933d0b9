"""Client data for simulated federations: client ``i`` holds the users of partition ``i``.

Every simulated client process (a Ray actor) reads the log once and keeps it, with its
partition, in a small cache keyed by the data and partition settings: a run touches one entry,
and a process serving several clients of the same run reads the file once, not once per message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from functools import lru_cache

import numpy as np

from client.client_app import ClientData
from core_model.config import DataConfig, ExperimentConfig, FederationConfig
from core_model.data import InteractionLog, LeaveOneOutSplit
from core_model.pipeline import load_log, split_log
from privacy.canaries import Canaries
from simulations.partition import Partition, partition_users

logger = logging.getLogger(__name__)


def partition_for(log: InteractionLog, split: LeaveOneOutSplit, federation: FederationConfig) -> Partition:
    """The partition ``federation`` describes (see ``FederationConfig``)."""
    kwargs = {"scheme": federation.partition, "seed": federation.seed}
    if federation.partition in ("attribute", "dirichlet-label"):
        kwargs["attribute"] = federation.partition_attribute
    if federation.partition in ("iid", "dirichlet-size", "dirichlet-label"):
        kwargs["num_clients"] = federation.num_clients
    if federation.partition.startswith("dirichlet"):
        kwargs["alpha"] = federation.dirichlet_alpha
    return partition_users(log, split, **kwargs)


@lru_cache(maxsize=2)
def _federation(data_json: str, federation_json: str) -> tuple[InteractionLog, LeaveOneOutSplit, Partition]:
    data = DataConfig(**json.loads(data_json))
    federation = FederationConfig(**json.loads(federation_json))
    log = load_log(data)
    split = split_log(log, data)
    return log, split, partition_for(log, split, federation)


def load_federation(config: ExperimentConfig) -> tuple[InteractionLog, LeaveOneOutSplit, Partition]:
    """(log, split, partition) for ``config``, cached per process."""
    return _federation(json.dumps(asdict(config.data), sort_keys=True),
                       json.dumps(asdict(config.federation), sort_keys=True))


@lru_cache(maxsize=2)
def _canaries(path: str) -> Canaries:
    return Canaries.load(path)


def with_canaries(split: LeaveOneOutSplit, histories: list[np.ndarray]) -> LeaveOneOutSplit:
    """``split`` with the canary users ``histories`` appended as its last rows (leave-one-out like
    every user: all but the last two items to train on; user index -1: not a user of the log)."""
    if not histories:
        return split
    return LeaveOneOutSplit(
        train=list(split.train) + [np.asarray(h[:-2], dtype=np.int64) for h in histories],
        valid_targets=np.concatenate([split.valid_targets, [int(h[-2]) for h in histories]]).astype(np.int64),
        test_targets=np.concatenate([split.test_targets, [int(h[-1]) for h in histories]]).astype(np.int64),
        user_index=np.concatenate([split.user_index, np.full(len(histories), -1)]).astype(np.int64),
        num_items=split.num_items, removed_short_users=split.removed_short_users)


def simulated_client_data(config: ExperimentConfig, partition_id: int) -> ClientData:
    """Partition ``partition_id``'s users, plus its included canary users when the run has canaries."""
    log, split, partition = load_federation(config)
    if not 0 <= partition_id < partition.num_clients:
        raise ValueError(f"partition-id {partition_id} is out of range: the federation has "
                         f"{partition.num_clients} clients")
    name = partition.names[partition_id]
    mine = split.subset(partition.rows[partition_id])
    path = config.privacy.audit_canary_file
    if not path:
        return ClientData(split=mine, num_items=log.num_items, name=name)
    canaries = _canaries(path)
    if canaries.num_items != log.num_items:
        raise ValueError(f"{path}: canaries drawn for a catalogue of {canaries.num_items} items, but the data "
                         f"has {log.num_items}")
    histories = canaries.of_client(name)
    return ClientData(split=with_canaries(mine, histories), num_items=log.num_items, name=name,
                      canaries=len(histories))
