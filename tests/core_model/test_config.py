"""Experiment config: defaults, overrides, and every error path."""

import pytest

from core_model.config import load_config, parse_override


def test_defaults_need_no_file():
    cfg = load_config()
    assert cfg.data.kind == "synthetic" and cfg.train.batch_size == 128 and cfg.eval.exclude_history
    assert cfg.model_config(50).num_items == 50


def test_file_and_overrides(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('[data]\nkind = "sasrec"\npath = "x.txt"\n[train]\nlr = 0.002\n[model]\nd_model = 32\n')
    cfg = load_config(f, ["train.epochs=7", "model.loss=sampled", "train.lr=1"])
    assert cfg.data.kind == "sasrec" and cfg.train.epochs == 7 and cfg.train.lr == 1.0
    assert cfg.model_config(9).d_model == 32 and cfg.model_config(9).loss == "sampled"


def test_parse_override_values():
    assert parse_override("train.lr=2e-3") == (["train", "lr"], 0.002)
    assert parse_override("data.kind=ml-1m") == (["data", "kind"], "ml-1m")
    assert parse_override('data.path="a b"') == (["data", "path"], "a b")
    assert parse_override("eval.sampled=false") == (["eval", "sampled"], False)


@pytest.mark.parametrize("overrides,needle", [
    (["train.lrr=1"], "unknown key(s) train.lrr"),
    (["bogus.x=1"], "unknown config section(s) ['bogus']"),
    (["train.epochs=0"], "epochs must be >= 1, got 0"),
    (["train.epochs=abc"], "train.epochs must be int, got 'abc'"),
    (["train.lr=-1"], "lr must be > 0, got -1.0"),
    (["data.kind=csv"], "data.kind must be one of"),
    (["data.kind=ml-1m"], "data.path is required for data.kind='ml-1m'"),
    (["model.num_items=5"], "model.num_items is taken from the data"),
    (['model.item_features="genres"', 'data.catalogue="items.txt"'],
     "model.item_features='genres' is not available in a deployment yet: data.catalogue='items.txt'"),
    (["model.loss=mse"], "loss must be one of"),
    (["eval.sampled=3"], "eval.sampled must be bool, got 3"),
    (["data.synthetic.num_users=0"], "num_users must be >= 1, got 0"),
    (["train"], "must look like section.key=value"),
    (["train.device=gpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
])
def test_bad_settings_name_the_key_and_value(overrides, needle):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.toml does not exist"):
        load_config(tmp_path / "does-not-exist.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        load_config(bad)


def test_federation_section_and_flower_run_config():
    from core_model.config import config_from_run_config
    cfg = load_config(None, ["federation.strategy=fedadam", "federation.num_rounds=3"])
    assert cfg.federation.strategy == "fedadam" and cfg.federation.num_rounds == 3
    flat = config_from_run_config({"federation.num-rounds": 5, "federation.partition": "iid",
                                   "federation.num-clients": 4, "train.lr": 0.01, "data.kind": "synthetic"})
    assert (flat.federation.num_rounds, flat.federation.num_clients, flat.train.lr) == (5, 4, 0.01)
    assert config_from_run_config({}) == load_config()
    with pytest.raises(ValueError, match="unknown key\\(s\\) federation.rounds"):
        config_from_run_config({"federation.rounds": 5})
    with pytest.raises(ValueError, match="must look like section.key"):
        config_from_run_config({"rounds": 5})


@pytest.mark.parametrize("overrides,needle", [
    (["federation.strategy=fedsgd"], "federation.strategy must be one of"),
    (["federation.partition=iid"], "federation.num_clients must be >= 1 for partition='iid', got 0"),
    (["federation.fraction_train=0"], "federation.fraction_train must be in (0, 1], got 0.0"),
    (["federation.client_gpus=2"], "federation.client_gpus must be -1 (auto) or in [0, 1], got 2.0"),
])
def test_bad_federation_settings(overrides, needle):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_secure_aggregation_defaults_follow_the_privacy_mode():
    from privacy.secagg import DEFAULT_SCALE_BITS, Quantizer
    off = load_config()
    assert off.privacy.secure_aggregation == "auto" and not off.privacy.secure_aggregation_enabled
    dp = load_config(None, ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0"])
    assert dp.privacy.secure_aggregation_enabled
    assert not load_config(None, ['privacy.mode="dp-sgd"', "privacy.noise_multiplier=1.0",
                                  'privacy.secure_aggregation="off"']).privacy.secure_aggregation_enabled
    assert load_config(None, ['privacy.secure_aggregation="on"']).privacy.secure_aggregation_enabled
    # the documented defaults: the quantizer's precision, and 32,767 clients per round
    assert off.privacy.secagg_scale_bits == DEFAULT_SCALE_BITS == 24 and off.privacy.secagg_bound == 2.0**24
    Quantizer(off.privacy.secagg_bound, max_clients=2**15 - 1, scale_bits=24)
    with pytest.raises(ValueError, match="max_clients"):
        Quantizer(off.privacy.secagg_bound, max_clients=2**15, scale_bits=24)
    assert load_config(None, ["privacy.secagg_bound=100"]).privacy.secagg_bound == 100.0  # an int is a float


@pytest.mark.parametrize("overrides,needle", [
    (['privacy.secure_aggregation="yes"'],
     "privacy.secure_aggregation must be one of ('auto', 'on', 'off') ('auto': on iff mode='dp-sgd'), got 'yes'"),
    (["privacy.secure_aggregation=true"], "privacy.secure_aggregation must be str, got True"),
    (["privacy.secagg_bound=0"], "privacy.secagg_bound must be a finite number > 0 (the largest "
                                 "|n_k * (w_local - w_global)| and n_k a client may contribute), got 0.0"),
    (["privacy.secagg_bound=inf"], "privacy.secagg_bound must be a finite number > 0"),
    (["privacy.secagg_bound=nan"], "privacy.secagg_bound must be a finite number > 0"),
    (["privacy.secagg_scale_bits=63"], "privacy.secagg_scale_bits must be an int in [0, 62] (fixed-point bits), "
                                       "got 63"),
    (["privacy.secagg_scale_bits=2.5"], "privacy.secagg_scale_bits must be int, got 2.5"),
    (["privacy.secagg_bound=1e12"], "privacy.secagg_bound must be small enough that 2 * ceil(secagg_bound * "
                                    "2**secagg_scale_bits) < 2**63 (the sum of two clients must fit int64) with "
                                    "secagg_scale_bits=24; lower one of them, got 1000000000000.0"),
])
def test_bad_secure_aggregation_settings(overrides, needle):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
