"""Config files and settings that would silently lose parts, or not end: one line naming the
file or value, before anything runs."""
import time

import pytest
import yaml

from pcn_ep.training.cli import MAX_CONFIG_NODES, check_config_files, main
from test_training import tiny_config


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pcn_ep:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def alias_bomb(levels=9, fold=9) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * fold)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fold)}]" for i in range(1, levels + 1)]
    return "\n".join(lines + [f"trainer:\n  max_epochs: 1\n  bogus: *a{levels}\n"])


def test_an_alias_bomb_is_refused_before_it_grows(tmp_path, capsys):
    """1 KB of YAML that expands to 9^10 values: jsonargparse would build them all (6 GB)."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    assert len(bomb.read_bytes()) < 1024
    began = time.perf_counter()
    with pytest.raises(ValueError, match="expands to more than 100,000 values"):
        check_config_files(["--config", str(bomb)])
    print(f"refused in {time.perf_counter() - began:.3f} s")  # measured, not asserted (busy CI)
    assert main(["fit", "--config", str(bomb)]) == 1
    assert "bomb.yaml expands to more than" in one_line(capsys)


def test_aliases_that_stay_small_are_fine(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text(alias_bomb(levels=2, fold=3))  # 1 + 3 + 9 + 27 values
    check_config_files(["--config", str(ok)])
    assert MAX_CONFIG_NODES >= 10_000


@pytest.mark.parametrize("content, says", [
    (b"trainer:\n  max_epochs: \xff\n", "is not UTF-8 text"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"- a\n- b\n", "is a list"),
    (b"trainer: 5\n", "trainer must be a mapping of settings, got 5"),
    (b"model: null\n", "model must be a mapping of settings, got None"),
    (b"a: 1\na: 2\n", "duplicate key 'a'"),
])
def test_a_config_file_that_would_lose_parts_is_one_line(tmp_path, capsys, content, says):
    path = tmp_path / "layer.yaml"
    path.write_bytes(content)
    base = tiny_config(tmp_path)[0]
    assert main(["fit", "--config", str(base), "--config", str(path)]) == 1
    line = one_line(capsys)
    assert line.startswith(f"pcn_ep: error: config file {path}") and says in line, line


@pytest.mark.parametrize("where, says", [("folder", "is a folder"), ("/dev/null", "is not a regular file"),
                                         ("missing", "does not exist")])
def test_a_config_that_is_not_a_file_says_what_it_is(tmp_path, capsys, where, says):
    path = {"folder": str(tmp_path), "missing": str(tmp_path / "nope.yaml")}.get(where, where)
    assert main(["fit", "--config", path]) in (1, 2)
    assert f"config file {path} {says}" in one_line(capsys)


@pytest.mark.parametrize("flag", ["--trainer.limit_train_batches=0", "--trainer.limit_train_batches=0.0",
                                  "--trainer.max_steps=0", "--trainer.max_epochs=0"])
def test_settings_that_train_nothing_are_refused(tmp_path, capsys, flag):
    assert main(["fit", "--config", str(tiny_config(tmp_path)[0]), flag]) == 1
    assert "nothing would be trained" in one_line(capsys)
    assert not (tmp_path / "checkpoints").exists()


def test_a_data_module_error_names_the_value_not_a_namespace_dump(tmp_path, capsys):
    code = main(["fit", "--config", str(tiny_config(tmp_path)[0]), "--data.init_args.batch_size", "abc"])
    line = one_line(capsys)
    assert code == 2 and "batch_size" in line and "abc" in line
    assert "Namespace(" not in line and "Subtypes" not in line and "NoneType" not in line, line


@pytest.mark.parametrize("make, says", [
    (lambda root: root.joinpath("checkpoints").write_text("x"), "checkpoints is a file, not a folder"),
    (lambda root: root.joinpath("checkpoints", ".lock").mkdir(parents=True), "is a folder; remove it"),
])
def test_a_run_folder_of_the_wrong_kind_is_one_line(tmp_path, capsys, make, says):
    path = tiny_config(tmp_path)[0]
    make(tmp_path)
    assert main(["fit", "--config", str(path)]) == 1
    assert says in one_line(capsys)


def test_a_run_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    path, cfg = tiny_config(tmp_path / "cfg" if (tmp_path / "cfg").mkdir() is None else tmp_path)
    (tmp_path / "run").write_text("a file where the run folder goes")
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "run")
    cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(path)]) == 1
    assert f"{tmp_path / 'run'} is a file, not a folder" in one_line(capsys)


def test_an_unforeseen_error_in_any_command_is_one_line(monkeypatch, capsys):
    """What no check foresaw still ends in one line naming the command, the error and where."""
    import pcn_ep.__main__ as entry
    from pcn_ep.tools import bench

    def broken(argv):
        raise KeyError("pytorch-lightning_version")

    monkeypatch.setattr(bench, "main", broken)
    assert entry.main(["bench"]) == 1
    line = one_line(capsys)
    assert line.startswith("pcn_ep: error: bench: unexpected KeyError: 'pytorch-lightning_version' (at ")
    assert "PCN_EP_TRACEBACK=1" in line
    monkeypatch.setenv("PCN_EP_TRACEBACK", "1")
    with pytest.raises(KeyError):
        entry.main(["bench"])
