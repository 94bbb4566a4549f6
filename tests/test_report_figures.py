"""Figures that neither hide nor overstate (issue 25): coinciding EP and BP curves both show, no
two cells look alike, one fidelity check epoch gives a dot per cell (not a curve of one point) on an
axis where equal values look equal, and Fig. 8's report says what was run (no training, no test
error) with whole-number K ticks."""
import json

import numpy as np
from matplotlib.colors import to_hex, to_rgb

from pcn_ep.experiments import report, tables
from test_report_integrity import _record, _texts


def _colour_at(fig, ax, x, y, dx=0, dy=0):
    """The colour drawn at data point (x, y) of ``ax``, ``dx``/``dy`` pixels off it."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())
    px, py = ax.transData.transform((x, y))
    return image[int(round(image.shape[0] - py - dy)), int(round(px + dx)), :3] / 255


def _line(ax, label):
    return next(line for line in ax.lines if line.get_label() == label)


def test_ep_and_bp_curves_that_coincide_both_show(tmp_path):
    """Fig. 3's smoke figure: EP's curve, its markers and its ◆ were drawn exactly under BP's."""
    for method in ("ep", "bp"):
        _record(tmp_path / method, "fig_init_gain", {"output_gain": 0.2, "method": method}, 0,
                "ok", 0.44, [(0, 0.8), (1, 0.44)])
    runs = report.read_runs(tmp_path)
    fig = report.build_figure("fig_init_gain", runs, report.summarize(runs))
    ax = fig.axes[0]
    ep, bp = _line(ax, "output_gain=0.2, method=ep"), _line(ax, "output_gain=0.2, method=bp")
    # EP's marker at epoch 1 and its ◆ at epoch 2 (the final test error, 44 %) show EP's colour.
    for x, y in zip(ep.get_xdata(), (80, 44)):
        assert np.allclose(_colour_at(fig, ax, x, y), to_rgb("C0"), atol=0.02), (x, y)
    # BP's wide, half transparent line shows along its own segment.
    light_bp = 0.55 * np.array(to_rgb("C1")) + 0.45   # over white
    (x0, x1), (y0, y1) = bp.get_xdata(), bp.get_ydata()
    assert any(np.allclose(_colour_at(fig, ax, x0 + t * (x1 - x0), y0 + t * (y1 - y0), dy=dy),
                           light_bp, atol=0.08) for t in np.linspace(0.1, 0.9, 17) for dy in (-1, 1))


def test_cells_with_equal_values_all_show(tmp_path):
    """Table 3's smoke figure: four PGD cells with the same errors, only the last one drawn seen."""
    labels = [c.labels for c in tables.TABLES["table_pgd"].cells()][:4]
    for i, cell in enumerate(labels):
        _record(tmp_path / str(i), "table_pgd", cell, 0, "ok", 0.39, [(0, 0.6), (1, 0.36)])
    runs = report.read_runs(tmp_path)
    fig = report.build_figure("table_pgd", runs, report.summarize(runs))
    ax = fig.axes[0]
    for i, cell in enumerate(labels):
        line = _line(ax, f"rule={cell['rule']}, K={cell['K']}")
        assert abs(line.get_xdata()[0] - 1) <= 0.15   # still read at its epoch
        for x, y in zip(line.get_xdata(), (60, 39)):   # its epoch-1 marker and its ◆
            assert np.allclose(_colour_at(fig, ax, x, y), to_rgb(f"C{i}"), atol=0.02), (i, x)


def test_no_two_of_24_cells_share_a_colour_and_a_marker(tmp_path):
    for i, cell in enumerate(tables.TABLES["table_schemes"].cells()):
        _record(tmp_path / str(i), "table_schemes", cell.labels, 0, "ok", 0.4, [(0, 0.5), (1, 0.4)],
                fidelity=[(0, 0.999, 0.01), (1, 0.998, 0.02)])
    runs = report.read_runs(tmp_path)
    fig = report.build_fidelity_figure("table_schemes", runs, report.summarize(runs))
    for ax in fig.axes:
        looks = [(to_hex(line.get_color()), line.get_marker(), line.get_linestyle())
                 for line in ax.lines]
        assert len(looks) == 24 and len(set(looks)) == 24
    (legend,) = fig.legends
    handles = [(to_hex(h.get_color()), h.get_marker()) for h in legend.legend_handles]
    assert len(set(handles)) == len(handles) == 24


def _fidelity_root(tmp_path, checks):
    """One EP cell of Fig. 4 per list of (epoch, cosine, relative error) checks."""
    for i, fidelity in enumerate(checks):
        _record(tmp_path / str(i), "fig_batch_size", {"batch_size": 16 * (i + 1), "method": "ep"},
                0, "ok", 0.3, [(0, 0.5), (1, 0.4)], fidelity=fidelity)
    runs = report.read_runs(tmp_path)
    return runs, report.summarize(runs)


def test_equal_fidelity_values_look_equal(tmp_path):
    """The smoke figure drew cosines 0.99986 and 0.99996 on a 0.99986–0.99996 axis: far apart."""
    runs, cells = _fidelity_root(tmp_path / "two", [[(0, 0.99986, 0.0101), (1, 0.99986, 0.0101)],
                                                    [(0, 0.99996, 0.0102), (1, 0.99996, 0.0102)]])
    one, one_cells = _fidelity_root(tmp_path / "one", [[(0, 0.99986, 0.0101)],
                                                       [(0, 0.99996, 0.0102)]])
    for fig, limits in ((report.build_fidelity_figure("fig_batch_size", runs, cells), "get_ylim"),
                        (report.build_fidelity_figure("fig_batch_size", one, one_cells),
                         "get_xlim")):
        cosine, rel_err = fig.axes
        low, high = getattr(cosine, limits)()
        assert low <= 0.99 and high >= 1.0
        low, high = getattr(rel_err, limits)()
        assert low <= 0.0 and high >= 0.1


def test_one_check_epoch_is_not_listed_as_first_and_last(tmp_path):
    runs, cells = _fidelity_root(tmp_path, [[(0, 0.9999, 0.0101)], [(0, 0.998, 0.02)]])
    md = report.markdown("fig_batch_size", runs, cells, report.paper_results())
    assert "last epoch" not in md and "first epoch" not in md
    assert "| cell | epoch checked | cosine | rel. error |" in md
    assert "| batch_size=16, method=ep | 1 | 0.9999 | 0.0101 |" in md
    # Beside a cell checked in two epochs, the one-epoch cell has no "last" value.
    runs, cells = _fidelity_root(tmp_path / "mixed", [[(0, 0.9999, 0.0101)],
                                                      [(0, 0.99, 0.02), (1, 0.98, 0.03)]])
    md = report.markdown("fig_batch_size", runs, cells, report.paper_results())
    assert "| batch_size=16, method=ep | 1 | 0.9999 | — | 0.0101 | — |" in md
    assert "| batch_size=32, method=ep | 1, 2 | 0.9900 | 0.9800 | 0.0200 | 0.0300 |" in md


def test_fig_8s_report_says_what_was_run(tmp_path):
    """Fig. 8 (``pcn_ep energy``) trains nothing: its Markdown spoke of test errors and its smoke
    banner of 2 epochs; its K axis ticked 2.5, 7.5, …"""
    run = tmp_path / "fig_energy" / "model=vgg10" / "seed0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"table": "fig_energy", "cell": {"model": "vgg10"},
                                              "seed": 0, "status": "ok", "smoke": True}))
    K = list(range(21))
    curve = [0.1 - 0.001 * min(k, 5) for k in K]
    images = [curve, curve, [v + 0.01 for v in curve]]   # two images give one curve
    (run / "energy.json").write_text(json.dumps({
        "K": K, "beta": 0.05, "K_config": 10, "images": 3, "checkpoint": None,
        "curves": {name: {"mean": curve, "per_image": images}
                   for name in ("mod-pgd/+", "mod-pgd/-", "pgd/+", "pgd/-")},
        "delta_F": {name: -0.005 for name in ("mod-pgd/+", "mod-pgd/-", "pgd/+", "pgd/-")}}))
    report.write_report(tmp_path, tmp_path / "out")
    md = (tmp_path / "out" / "fig_energy.md").read_text()
    banner = md.split("**")[1]
    assert "epoch" not in banner and "at initialization" in banner and "3 validation" in banner
    assert "test error" not in md.lower().replace("no test error", "")
    assert "untrained" in md and "K = 0..20" in md
    runs = report.read_runs(tmp_path)
    fig = report.build_figure("fig_energy", runs, report.summarize(runs), smoke=True)
    assert "epoch" not in _texts(fig)
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert all(float(t).is_integer() for t in ax.get_xticks() if low <= t <= high)
        assert "2 distinct curves of 3 images" in ax.get_title()


def test_relative_errors_over_decades_get_a_log_axis(tmp_path):
    """Fig. 5's smoke runs: one diverging α = 1 cell at 62.9 put 0.017 and 0.99 both at 0."""
    runs, cells = _fidelity_root(tmp_path, [[(0, 0.9999, 0.0172)], [(0, 0.99, 0.99)],
                                            [(0, -0.8, 62.9)]])
    cosine, rel_err = report.build_fidelity_figure("fig_batch_size", runs, cells).axes
    assert rel_err.get_xscale() == "log" and cosine.get_xscale() == "linear"
    low, high = cosine.get_xlim()
    assert low <= -0.8 and high >= 1.0
