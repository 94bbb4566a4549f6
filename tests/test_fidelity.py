"""The gradient-fidelity callback: gradcheck's figures, logged during a quickstart-like run (CSV
and W&B), without changing what the run trains."""
import csv
import glob
import json
from pathlib import Path

import pytest
import torch
import yaml

from pcn_ep.core import VGG5, Dynamics, EquilibriumPropagation, gradient_fidelity
from pcn_ep.experiments import report
from pcn_ep.experiments.report import _wandb_records
from pcn_ep.training.cli import DEFAULT_CONFIG, main
from pcn_ep.training.fidelity import GradientFidelity

SEEN: dict = {}  # what Capture saw, by step


class Capture(GradientFidelity):
    """Records weights, batch and sign generator just before the fidelity check of each step it
    checks (listed before GradientFidelity in the config, so it sees the same state)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % self.every_n_steps == 0:
            SEEN[trainer.global_step] = (
                {k: v.clone() for k, v in pl_module.network.state_dict().items()},
                [t.clone() for t in batch], pl_module.signs.get_state())


def fit(root, fidelity: bool):
    """The embedded default shrunk to 2 epochs of 3 batches, random scheme, CSV and W&B offline."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    cfg["trainer"].update(max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                          default_root_dir=str(root), enable_progress_bar=False)
    cfg["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger",
         "init_args": {"save_dir": str(root), "name": "csv"}},
        {"class_path": "pcn_ep.training.loggers.WandbLogger",
         "init_args": {"save_dir": str(root), "project": "pcn-ep-test", "offline": True}}]
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = f"{root}/checkpoints"
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"]  # the config's own check
                                   if not c["class_path"].endswith("GradientFidelity")]
    if fidelity:
        cfg["trainer"]["callbacks"] += [
            {"class_path": "test_fidelity.Capture", "init_args": {"every_n_steps": 2}},
            {"class_path": "pcn_ep.training.fidelity.GradientFidelity",
             "init_args": {"every_n_steps": 2}}]
    cfg["model"].update(scheme="random")
    cfg["test_after_fit"] = False
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(root / "config.yaml")]) == 0
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    SEEN.clear()
    with_cb, without = tmp_path_factory.mktemp("with"), tmp_path_factory.mktemp("without")
    return with_cb, fit(with_cb, True), fit(without, False)


def test_logged_figures_equal_gradcheck_on_the_same_weights_batch_and_signs(runs):
    root, _, _ = runs
    assert sorted(SEEN) == [0, 2, 4]
    state, (x, y), signs = SEEN[4]  # epoch 1, after four updates
    net = VGG5(1, 10, 16, width_mult=0.125)
    net.load_state_dict(state)
    generator = torch.Generator().manual_seed(123)
    generator.set_state(signs)
    ep = EquilibriumPropagation("mse", "nudge", "random", 0.02, Dynamics(5), generator=generator)
    checked = gradient_fidelity(net, ep, x, y)
    want = {"epoch": 1.0, "fidelity/diverged": 0.0, "fidelity/min_cosine": checked["min_cosine"],
            "fidelity/max_rel_err": checked["max_rel_err"]}
    for k, layer in enumerate(checked["layers"], start=1):  # VGG5 4conv: layers 1-4 pool
        names = ("cosine", "rel_err", "kinks") + (("ties",) if k <= 4 else ())
        want.update({f"fidelity/layer{k}/{name}": float(layer[name]) for name in names})
    assert len(want) == 4 + 5 * 3 + 4 and 0.9 < want["fidelity/min_cosine"] < 1

    with open(glob.glob(str(root / "csv" / "version_*" / "metrics.csv"))[0]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("fidelity/layer1/cosine")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert {k: float(rows[2][k]) for k in want} == want

    logged = [h for h in _history(next((root / "wandb").glob("offline-run-*")))
              if "fidelity/layer1/cosine" in h]
    assert [h["trainer/global_step"] for h in logged] == [0, 2, 4]
    assert {k: logged[2][k] for k in want} == want


def test_the_report_reads_the_monitor_from_the_runs_csv_as_wandb_logged_it(runs, tmp_path):
    """What the fit logged is what ``report`` draws: per-epoch curves from metrics.csv (as
    ``reproduce`` leaves it beside run.json) and from the offline W&B run folder alike."""
    root, _, _ = runs
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.csv").write_bytes(
        next((root / "csv").glob("version_*/metrics.csv")).read_bytes())
    (folder / "run.json").write_text(json.dumps(
        {"table": "table_costs", "cell": {"method": "ep"}, "seed": 0, "status": "ok"}))
    from_csv = report.read_record(folder / "run.json")
    assert sorted(from_csv.curves["fidelity/min_cosine"]) == [0, 1]   # checks at steps 0, 2 | 4
    wandb_dir = next((root / "wandb").glob("offline-run-*"))
    min_cosine = [h["fidelity/min_cosine"] for h in _history(wandb_dir)
                  if "fidelity/min_cosine" in h]
    assert from_csv.curves["fidelity/min_cosine"] == pytest.approx(
        {0: (min_cosine[0] + min_cosine[1]) / 2, 1: min_cosine[2]})
    assert report.has_fidelity([from_csv])


def _history(run_dir: Path) -> list[dict]:
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in _wandb_records(next(run_dir.glob("run-*.wandb")))
            if r.WhichOneof("record_type") == "history"]


def test_the_check_changes_nothing_the_run_trains(runs):
    """Same seed with and without the callback: bitwise equal weights, optimizer and sign
    generator (the random scheme's signs come from a copy of the generator)."""
    _, a, b = runs
    assert a["sign_generators"][0].equal(b["sign_generators"][0])
    assert len(a["state_dict"]) == 10
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    moments = [s["momentum_buffer"] for s in a["optimizer_states"][0]["state"].values()]
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in
               zip(moments, b["optimizer_states"][0]["state"].values()))


def test_interval_must_be_a_positive_integer():
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            GradientFidelity(bad)


def test_the_check_leaves_a_batchnorms_running_statistics_alone():
    """Its backprop and EP passes run the network in training mode: without putting the buffers
    back, each check would move BatchNorm's running statistics twice more than training does."""
    from types import SimpleNamespace
    from contextlib import nullcontext

    from pcn_ep.core import ResNetPCN

    torch.manual_seed(0)
    net = ResNetPCN(in_channels=1, num_classes=3, input_size=8, width_mult=1 / 16, blocks=(1,),
                    norm="batch")
    before = [b.clone() for b in net.buffers()]
    ep = EquilibriumPropagation("ce", "nudge", "centered", 1e-3, Dynamics(4, "mod-pgd", "async", 1.0))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, current_epoch=0, loggers=[],
                              precision_plugin=SimpleNamespace(train_step_context=nullcontext))
    module = SimpleNamespace(estimator=ep, network=net)
    GradientFidelity(1).on_train_batch_start(trainer, module, (torch.randn(6, 1, 8, 8),
                                                               torch.tensor([0, 1, 2, 0, 1, 2])), 0)
    assert len(before) > 2 and all(torch.equal(a, b) for a, b in zip(before, net.buffers()))


def test_the_input_shape_probe_leaves_a_batchnorms_running_statistics_alone():
    """The module's setup sends one zero example through the network: in eval mode, or
    BatchNorm's running statistics would start from a step of zeros."""
    from pcn_ep.core import ResNetPCN
    from pcn_ep.training.module import PCNEPModule

    net = ResNetPCN(in_channels=1, num_classes=3, input_size=8, width_mult=1 / 16, blocks=(1,),
                    norm="batch")
    before = [b.clone() for b in net.buffers()]
    module = PCNEPModule(net, K=4)
    module._check_input_shape((1, 8, 8))
    assert module.network.training and all(torch.equal(a, b) for a, b in zip(before, net.buffers()))
