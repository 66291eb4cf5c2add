"""``comm.tp_overlap`` is refused before any process group exists when there is no tensor parallelism."""

import pytest

from meshweave.config import Config, ConfigError
from meshweave.validation import validate


def test_tp_overlap_without_tensor_parallelism_is_a_config_error_naming_the_key():
    cfg = Config()
    cfg.comm.tp_overlap = True
    with pytest.raises(ConfigError, match=r"comm\.tp_overlap.*parallel\.tp > 1"):
        validate(cfg, world_size=2)


def test_tp_overlap_with_tensor_parallelism_is_accepted():
    cfg = Config()
    cfg.comm.tp_overlap, cfg.parallel.tp = True, 2
    validate(cfg, world_size=2)
