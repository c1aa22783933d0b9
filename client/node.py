"""A deployed node's own settings and data: what its operator passes as ``--node-config``.

In a simulation a node is told its ``partition-id``; in a deployment (one SuperNode per merchant
or region, ``docs/deployment.md``) it holds its own data on disk and its operator's privacy policy,
and the server's run config cannot change either::

    flower-supernode ... --node-config 'name="merchant-0" data-path="/srv/fedrec/merchant-0.csv"
        catalogue="/srv/fedrec/catalogue.txt" privacy-policy="/srv/fedrec/policy.toml"
        state-dir="/srv/fedrec/state"'

* ``name``: the client's name (its ledger is ``<state-dir>/<name>/ledger.jsonl``);
* ``data-path``: the node's interaction log; ``data-kind``: its format (default ``interactions``:
  a CSV / Parquet file with the run config's ``data.user_col`` / ``data.item_col`` ... columns);
* ``catalogue``: the public item catalogue, one raw item id per line in index order (default: the
  run config's ``data.catalogue``); every party indexes items by it, so that weights line up;
* ``privacy-policy`` and ``state-dir``: the operator's policy file and the folder of the node's
  privacy ledger; they take precedence over ``privacy.policy`` / ``privacy.state_dir`` in the run
  config (a server cannot point a node at a laxer policy or another ledger).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

from core_model.config import DataConfig, ExperimentConfig
from core_model.pipeline import align_to_vocabulary, load_log, read_catalogue, split_log

logger = logging.getLogger(__name__)

NODE_KEYS = ("name", "data-path", "data-kind", "catalogue", "privacy-policy", "state-dir")
DATA_PATH = "data-path"


@dataclass(frozen=True)
class NodeSettings:
    """A deployed node's ``--node-config`` (see the module docstring)."""

    name: str
    data_path: str
    data_kind: str = "interactions"
    catalogue: str = ""
    privacy_policy: str = ""
    state_dir: str = ""

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        unknown = sorted(set(node_config) - set(NODE_KEYS))
        if unknown:
            raise ValueError(f"unknown node config key(s) {unknown}; a deployed node accepts {list(NODE_KEYS)}")
        values = {k.replace("-", "_"): v for k, v in node_config.items()}
        for key, value in values.items():
            if not isinstance(value, str):
                raise ValueError(f"node config {key.replace('_', '-')} must be a string, got {value!r}")
        for key in ("name", "data_path"):
            if not values.get(key):
                raise ValueError(f"node config {key.replace('_', '-')} is required for a deployed node, "
                                 f"got {values.get(key)!r}")
        return cls(**values)

    def apply(self, config: ExperimentConfig) -> ExperimentConfig:
        """``config`` with this node's policy, state directory and catalogue (the node's own win)."""
        privacy = replace(config.privacy, policy=self.privacy_policy or config.privacy.policy,
                          state_dir=self.state_dir or config.privacy.state_dir)
        data = replace(config.data, catalogue=self.catalogue or config.data.catalogue)
        return replace(config, privacy=privacy, data=data)


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """Whether a node runs in a deployment (it names its own data) rather than a simulation."""
    return DATA_PATH in node_config


def node_client_data(config: ExperimentConfig, node: NodeSettings):
    """The node's own users (leave-one-out split) with items indexed by the catalogue; cached per process."""
    data = replace(config.data, kind=node.data_kind, path=node.data_path,
                   catalogue=node.catalogue or config.data.catalogue)
    return _node_data(json.dumps(asdict(data), sort_keys=True), node.name)


@lru_cache(maxsize=2)
def _node_data(data_json: str, name: str):
    from client.client_app import ClientData

    data = DataConfig(**json.loads(data_json))
    items = read_catalogue(data.catalogue)
    log = align_to_vocabulary(load_log(data), items)
    split = split_log(log, data)
    logger.info("node %s: %d users from %s, catalogue of %d items", name, len(split), data.path, len(items))
    return ClientData(split=split, num_items=len(items), name=name)
