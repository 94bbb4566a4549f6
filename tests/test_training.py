"""Training through the CLI: determinism, resume, W&B offline, clear errors (training issue)."""
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pcn_ep.training.cli import DEFAULT_CONFIG, main


def tiny_config(tmp_path, **model):
    """The embedded default, shrunk: 2 epochs of 8 batches, a narrow net, files under tmp_path."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    root = str(tmp_path)
    cfg["trainer"].update(max_epochs=2, limit_train_batches=8, limit_val_batches=2,
                          default_root_dir=root, enable_progress_bar=False)
    cfg["trainer"]["logger"] = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                 "init_args": {"save_dir": root, "name": "csv"}}]
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = f"{root}/checkpoints"
    cfg["model"]["network"]["init_args"]["width_mult"] = 0.0625
    cfg["model"].update(model)
    cfg["test_after_fit"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def final_weights(tmp_path):
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("network.")}


def fit(path, *extra):
    assert main(["fit", "--config", str(path), *extra]) == 0


def test_two_fits_with_the_same_seed_are_bitwise_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        fit(tiny_config(d, scheme="random")[0])
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tmp_path / "c"
    c.mkdir()
    fit(tiny_config(c, scheme="random", seed=1)[0], "--seed_everything", "1",
        "--data.init_args.seed", "1")
    assert not all(torch.equal(wa[k], v) for k, v in final_weights(c).items())


def test_resume_from_last_checkpoint_matches_an_uninterrupted_fit(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    whole.mkdir()
    parts.mkdir()
    fit(tiny_config(whole, scheme="random", t_max=2)[0])
    path, _ = tiny_config(parts, scheme="random", t_max=2)  # the stopped run keeps the schedule
    fit(path, "--trainer.max_epochs", "1")
    fit(path, "--ckpt_path", "last")
    wa, wb = final_weights(whole), final_weights(parts)
    assert len(wa) == 10 and all(torch.equal(wa[k], wb[k]) for k in wa)  # not vacuous


def test_wandb_offline_run_folder_holds_the_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    path, cfg = tiny_config(tmp_path)
    cfg["trainer"]["logger"] = [{"class_path": "pcn_ep.training.loggers.WandbLogger",
                                 "init_args": {"save_dir": str(tmp_path), "project": "pcn-ep-test",
                                               "group": "tests", "tags": ["tiny"]}}]
    path.write_text(yaml.safe_dump(cfg))
    fit(path)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    # wandb >= 0.2x writes history as protobuf records into run-*.wandb (read back by `wandb sync`)
    records = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
    for key in (b"val/top1_error", b"val/top5_error", b"train/loss", b"train/energy+", b"lr",
                b"pcn-ep-test", b"tests", b"tiny"):
        assert key in records, key
    # the whole resolved config (network, data, trainer), not only the module's settings
    for key in (b"width_mult", b"0.0625", b"max_epochs", b"DigitsDataModule", b"max_shift"):
        assert key in records, key


@pytest.mark.parametrize("override, message", [
    (["--model.beta", "0"], "beta must be > 0"),
    (["--model.K", "0"], "K (nudge iterations) must be an integer >= 1"),
    (["--model.scheme", "sideways"], "sideways"),
    (["--model.network.init_args.num_classes", "7"], "the data has 10 classes"),
    (["--model.betta", "0.1"], "model.betta"),
])
def test_impossible_config_fails_before_training_with_one_error_line(tmp_path, capsys, override,
                                                                     message):
    path, _ = tiny_config(tmp_path)
    code = main(["fit", "--config", str(path), *override])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert code != 0 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()


def test_cli_exit_status_and_error_line_in_a_subprocess(tmp_path):
    path, _ = tiny_config(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pcn_ep", "fit", "--config", str(path),
                           "--model.beta", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("pcn_ep: error: beta must be > 0")


def test_compile_option_trains_through_the_whole_graph_estimator(tmp_path, monkeypatch):
    """``model.compile`` routes every step through ``core.compile_estimator`` (fullgraph); the
    eager backend keeps the test fast while dynamo still traces the whole step without a break."""
    import functools

    import lightning as L

    from pcn_ep.core import MLP, compile_estimator
    from pcn_ep.data import SparseParityDataModule
    from pcn_ep.training import module as module_file

    calls = []

    def eager_compile(estimator, **options):
        calls.append(estimator)
        return compile_estimator(estimator, backend="eager", **options)

    monkeypatch.setattr(module_file, "compile_estimator", eager_compile)
    torch.manual_seed(0)
    model = module_file.PCNEPModule(MLP(6, 2, hidden=(8,)), K=3, scheme="random", compile=True)
    assert calls == [model.estimator] and isinstance(model._estimate, functools.partial)
    before = [p.detach().clone() for p in model.parameters()]
    L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False,
              default_root_dir=tmp_path).fit(model, SparseParityDataModule(n_bits=6, k_sparse=2))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fit_ends_with_a_summary_of_results_and_files(tmp_path, capsys):
    path, cfg = tiny_config(tmp_path)
    cfg["test_after_fit"] = True
    cfg["trainer"]["max_epochs"] = 1
    path.write_text(yaml.safe_dump(cfg))
    fit(path)
    out = capsys.readouterr().out
    summary = out[out.index("pcn_ep: done."):]
    assert "test error: top1 " in summary and "top5 " in summary
    for name in ("best checkpoint", "last checkpoint", "metrics (CSV)"):
        line = next(l for l in summary.splitlines() if name in l)
        assert Path(line.split(": ", 1)[1]).exists(), line
