"""``--checkpoint.init_from=<meshweave step-N>`` starts any layout from exactly the saved weights.

The source is saved sharded (dp_shard=2); each rank of the new run loads only its own shards of
the entries its stage holds (DCP). With ``optim.lr=1e-30`` (an update far below half an ulp of
every weight: lr must be > 0) a run's final checkpoint must hold the source's weights bit for bit
on every layout; with training on, the layouts then follow one
another within 1e-4 per step (fp32, the parity bound) from a start that is not the seed's.
"""

import torch

from meshweave.checkpoint.hf import read_model_weights
from tests.parity import assert_losses_match, final_weights, losses, train_run

SAVE = "--checkpoint.save_final=true"
LAYOUTS = {
    "one": (1, []),
    "tp2-fsdp2": (4, ["--parallel.tp=2", "--parallel.dp_shard=2"]),
    "pp2": (2, ["--parallel.pp=2"]),
}


def test_init_from_a_sharded_checkpoint_loads_its_weights_exactly_on_every_layout(tmp_path, reference_run):
    train_run(tmp_path / "source", 2, "--parallel.dp_shard=2", SAVE, steps=3)
    source = tmp_path / "source" / "checkpoints" / "step-3"
    _, saved = read_model_weights(source)
    start = f"--checkpoint.init_from={source}"
    for name, (nproc, layout) in LAYOUTS.items():
        train_run(tmp_path / f"frozen-{name}", nproc, *layout, start, "--optim.lr=1e-30", SAVE, steps=1)
        loaded = final_weights(tmp_path / f"frozen-{name}")
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved), name
    trained = {name: losses(train_run(tmp_path / name, n, *lay, start, steps=3)) for name, (n, lay) in LAYOUTS.items()}
    for name in ("tp2-fsdp2", "pp2"):
        assert_losses_match(trained["one"], trained[name], rtol=1e-4)
    assert trained["one"][0] != losses(reference_run(1, steps=3))[0]
