"""The module checks every batch at its boundary, whatever data module made it (a user's own
LightningDataModule is not checked by anything else): labels in [0, classes), finite inputs. A
bad batch is one error line naming the split, epoch and step; in training the check rides on the
step's one device read."""
import pytest
import yaml

from pcn_ep.training.cli import main
from test_training import tiny_config


def user_data_config(tmp_path, split, fault):
    path, cfg = tiny_config(tmp_path)
    cfg["data"] = {"class_path": "user_data.UserData", "init_args": {"split": split, "fault": fault}}
    cfg["test_after_fit"] = True
    cfg["trainer"].update(max_epochs=1, num_sanity_val_steps=0)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("split, fault, says", [
    ("train", "high", "bad train batch at epoch 0, step 1: 1 labels outside [0, 10) (min 2, max 10)"),
    ("train", "nan", "bad train batch at epoch 0, step 1: 1 non-finite input values"),
    ("val", "negative", "bad val batch 1 at epoch 0: 1 labels outside [0, 10) (min -1,"),
    ("val", "inf", "bad val batch 1 at epoch 0: 1 non-finite input values"),
    ("test", "high", "bad test batch 1: 1 labels outside [0, 10)"),
    ("test", "nan", "bad test batch 1: 1 non-finite input values"),
])
def test_a_bad_batch_from_a_users_data_module_is_one_line(tmp_path, capsys, split, fault, says):
    assert main(["fit", "--config", str(user_data_config(tmp_path, split, fault))]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pcn_ep:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"pcn_ep: error: {says}"), lines[0]


def test_good_data_from_a_users_data_module_trains(tmp_path):
    assert main(["fit", "--config", str(user_data_config(tmp_path, "none", "none"))]) == 0


def test_the_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """The batch check joins the step's health flags: still one host read per step."""
    from test_sync_free import HostSyncs
    from pcn_ep.training.module import PCNEPModule

    reads = []
    step = PCNEPModule.training_step

    def counted(self, batch, batch_idx):
        with HostSyncs() as syncs:
            out = step(self, batch, batch_idx)
        reads.append(syncs.calls)
        return out

    monkeypatch.setattr(PCNEPModule, "training_step", counted)
    path = user_data_config(tmp_path, "none", "none")
    assert main(["fit", "--config", str(path), "--trainer.limit_train_batches", "3",
                 "--test_after_fit", "false"]) == 0
    assert reads[:2] == [["tolist"], ["tolist"]], reads  # a GPU adds its one copy to the host


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_bad_batch_on_one_ddp_rank_stops_both(tmp_path, split):
    """2 gloo processes, the bad batch in rank 1's shard only: both ranks end with the error
    (before, a bad evaluation batch ended rank 1 alone; rank 0 found its peer gone at the epoch's
    metric sync, an "unexpected RuntimeError" under gloo, a wait for the timeout under NCCL)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = user_data_config(tmp_path, split, "nan")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["init_args"]["rank"] = 1
    cfg["trainer"].update(strategy="ddp", devices=2, accelerator="cpu")
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run([sys.executable, "-m", "pcn_ep", "fit", "--config", str(path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("pcn_ep:")]
    assert lines and all(line.startswith(f"pcn_ep: error: bad {split} batch") for line in lines), lines
    assert any("non-finite input values" in line for line in lines), lines
