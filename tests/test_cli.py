"""The command line, the demo's methods, the benchmarks' options and outputs."""

import argparse
import io
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_tree

import gradtransforms as gt
from gradtransforms import __main__ as cli
from gradtransforms.bench import BENCHMARKS, DEFAULT_OUT, load
from gradtransforms.bench import overhead, stability
from gradtransforms.catalogue import CATALOGUE
from gradtransforms.demo import methods, tables
from gradtransforms.demo.progress import Steps

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _usage_error(argv, capsys) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


# --- validation: usage errors before anything is written --------------------

@pytest.mark.parametrize("argv,arg", [
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "ten"], "--steps"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--methods", "global_norm(1)"], "--methods"),
    (["demo", "--scenarios", "nope"], "--scenarios"),
    (["bench", "overhead", "--rounds", "0"], "--rounds"),
    (["bench", "overhead", "--steps-per-sample", "0"], "--steps-per-sample"),
    (["bench", "overhead", "--sizes", "-1"], "--sizes"),
    (["bench", "overhead", "--methods", "clip"], "--methods"),
    (["bench", "stability", "--seeds", "0"], "--seeds"),
    (["bench", "stability", "--steps", "0"], "--steps"),
    (["bench", "sharded_train", "--batch", "0"], "--batch"),
    (["bench", "nope"], "NAME"),
])
def test_bad_arguments_are_usage_errors_naming_the_argument(argv, arg, capsys,
                                                            tmp_path):
  out = tmp_path / "out"
  if argv[0] == "demo" or argv[1] in ("overhead", "stability"):
    argv = argv + ["--out", str(out)]
  err = _usage_error(argv, capsys)
  assert arg in err and "usage:" in err
  assert not out.exists()  # nothing created


def test_out_must_not_be_a_file(tmp_path, capsys):
  f = tmp_path / "f"
  f.write_text("")
  assert "not a folder" in _usage_error(["demo", "--out", str(f)], capsys)


def _parsers():
  yield "gradtransforms", cli.parser()
  demo = cli.parser()._subparsers._group_actions[0].choices["demo"]
  yield "demo", demo
  for name in BENCHMARKS:
    yield name, load(name).parser()


PARSERS = list(_parsers())


@pytest.mark.parametrize("name,parser", PARSERS, ids=[n for n, _ in PARSERS])
def test_every_option_has_help_default_and_choices(name, parser):
  text = parser.format_help()
  for a in parser._actions:
    if isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                      argparse._SubParsersAction)) or not a.option_strings:
      continue
    assert a.help, f"{name} {a.option_strings} has no help"
    if a.default is None:
      assert "default" in a.help, f"{name} {a.option_strings}: say the default"
    if a.choices:
      assert all(str(c) in " ".join(text.split()) for c in a.choices), a.option_strings
  assert "(default:" in text or name == "gradtransforms"


def test_bench_help_dispatches_to_the_benchmark(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "overhead", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: gradtransforms bench overhead")
  assert "--steps-per-sample" in out and "--replot-from" in out


def test_results_never_go_to_the_committed_folder_by_default():
  for mod in (overhead, stability):
    assert mod.parser().parse_args([]).out == Path(DEFAULT_OUT)
  assert DEFAULT_OUT in (ROOT / ".gitignore").read_text()


# --- names: the catalogue's, no shell quoting -------------------------------

def test_demo_names_need_no_quoting_and_match_the_cli():
  assert cli.DEMO_METHODS == tuple(methods.METHODS)
  assert cli.DEMO_SCENARIOS == tuple(methods.SCENARIOS)
  for n in [*methods.METHODS, *methods.SCENARIOS, *overhead.NAMES]:
    assert re.fullmatch(r"[A-Za-z0-9_.+-]+", n), n
  for parts in methods.METHODS.values():
    assert all(name in CATALOGUE for name, _ in parts)
  assert set(overhead.NAMES) - {overhead.REFERENCE} <= set(CATALOGUE)


# --- tables and progress -----------------------------------------------------

def test_markdown_table():
  md = tables.markdown(["name", "x", "n"], [["a|b", 1.23456, None],
                                            ["c", float("nan"), 3]])
  assert md == ("| name | x | n |\n|---|---:|---:|\n"
                "| a\\|b | 1.23 | - |\n| c | - | 3 |\n")
  with pytest.raises(ValueError, match="row 0"):
    tables.markdown(["a", "b"], [[1]])
  with pytest.raises(ValueError, match="align"):
    tables.markdown(["a"], [[1]], align="x")


def test_progress_lines_when_not_a_terminal():
  buf = io.StringIO()
  with Steps(2, "runs", stream=buf) as p:
    for name in ("a / b", "c / d"):
      p.start(name)
      p.done()
  lines = buf.getvalue().splitlines()
  assert len(lines) == 2
  assert re.fullmatch(r"\[1/2 runs, \d+s\] a / b", lines[0])
  assert lines[1].startswith("[2/2 runs")


# --- the overhead benchmark, tiny -------------------------------------------

def test_count_kernels_counts_entry_fusions_and_custom_calls():
  class Fake:
    def as_text(self):
      return ("%fused_a { ... }\n"
              "%other (p: f32[3]) -> f32[3] {\n  %f9 = f32[3] fusion(%p), kind=kLoop\n}\n"
              "ENTRY %main (a: f32[3]) -> f32[3] {\n"
              "  %f1 = f32[3] fusion(%a), kind=kLoop, calls=%fused_a\n"
              "  %f2 = (f32[3], f32[]) fusion(%f1), kind=kInput\n"
              "  %cc = f32[3] custom-call(%f2), custom_call_target=\"x\"\n"
              "  %c = f32[3] copy(%cc)\n}\n")
  assert overhead.count_kernels(Fake()) == 3


def test_overhead_quick_run_writes_its_files(tmp_path, capsys):
  argv = ["--sizes", "0.002", "--leaves", "3", "--rounds", "2", "--warmup", "1",
          "--no-models", "--methods", "one_read", "clip_by_global_norm",
          "clip_by_leaf_norm", "guard", "--stacked", "--layers", "4",
          "--stacked-leaves", "2", "--steps-per-sample", "2",
          "--compile-leaves", "2", "--out", str(tmp_path)]
  assert overhead.main(argv) == 0
  out = capsys.readouterr().out
  assert "[1/3 chunks of methods" in out  # plain progress lines
  for ext in ("md", "json", "png"):
    assert (tmp_path / f"overhead.{ext}").exists()
  assert (tmp_path / "overhead_compile.png").exists()
  data = json.loads((tmp_path / "overhead.json").read_text())
  comp = {r["method"]: r for r in data["compile"]}
  assert set(comp) == {"clip_by_global_norm", "clip_by_leaf_norm", "guard"}
  assert all(r["leaves"] == 2 and r["compile_s"] > 0 and r["vs_adam"] > 0
             for r in comp.values())
  assert data["machine"]["steps_per_sample"] == 2
  rows = {(r["kind"], r["method"]): r for r in data["rows"]}
  assert set(rows) == {(k, m) for k in ("tree", "stacked") for m in
                       ("one_read", "clip_by_global_norm", "clip_by_leaf_norm",
                        "guard")}
  for r in rows.values():
    assert r["vs_adam"] > 0 and r["kernels"] > 0 and r["adam_kernels"] > 0
    assert r["kernels"] >= r["adam_kernels"]
  cgn = rows[("tree", "clip_by_global_norm")]
  assert cgn["optax_kernels"] > 0 and "optax_vs_adam" in cgn
  stacked = rows[("stacked", "clip_by_leaf_norm")]
  assert stacked["layers"] == 4
  assert stacked["layer_axes"] == 0 or "rejected" in stacked["layer_axes"]
  assert rows[("stacked", "one_read")]["layer_axes"] is None
  md = (tmp_path / "overhead.md").read_text()
  assert "| 0.002M params, 4 layers stacked in 2 leaves | clip_by_leaf_norm |" in md
  assert "| method | 2 leaves |" in md


def test_overhead_compile_times_alone(tmp_path, capsys):
  """--no-trees --no-models: only the compile-time table and its plot (no
  step table, no step plot; this crashed in the plot before)."""
  argv = ["--no-trees", "--no-models", "--methods", "clip_by_global_norm",
          "--compile-leaves", "2", "--compile-repeats", "2",
          "--out", str(tmp_path)]
  assert overhead.main(argv) == 0
  md = (tmp_path / "overhead.md").read_text()
  assert "Compile time" in md
  assert "Step time" not in md and "| method | 2 leaves |" in md
  assert (tmp_path / "overhead_compile.png").exists()
  assert not (tmp_path / "overhead.png").exists()
  assert "overhead.png" not in capsys.readouterr().out
  rows = json.loads((tmp_path / "overhead.json").read_text())
  assert rows["rows"] == [] and rows["compile"][0]["method"] == "clip_by_global_norm"
  # each figure the fastest of 2 compiles, and the table says so
  assert rows["compile"][0]["repeats"] == 2 and "fastest of 2 compiles" in md


def _png_size(path: Path) -> tuple[int, int]:
  head = path.read_bytes()[:24]
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.parametrize("mod,name", [(overhead, "overhead"),
                                      (stability, "stability")])
def test_replot_from_committed_json(mod, name, tmp_path, capsys):
  src = RESULTS / f"{name}.json"
  assert mod.main(["--replot-from", str(src), "--out", str(tmp_path)]) == 0
  w, h = _png_size(tmp_path / f"{name}.png")
  assert 600 <= w <= 1300 and h <= 1100  # readable at README width
  assert list(tmp_path.iterdir()) == [tmp_path / f"{name}.png"]


def test_stability_colours_are_relative_to_the_best_in_the_row(tmp_path):
  rows = [{"scenario": "s", "method": m, "diverged": d, "runs": 3,
           "final_loss": l, "spikes": 0.0, "skipped": 0.0}
          for m, d, l in (("a", 0, 0.5), ("b", 1, 4e20), ("c", 3, float("nan")))]
  import matplotlib
  matplotlib.use("Agg")
  captured = {}
  import matplotlib.axes
  orig = matplotlib.axes.Axes.imshow

  def spy(self, data, *a, **k):
    captured["data"] = np.ma.filled(data, np.nan)
    return orig(self, data, *a, **k)

  matplotlib.axes.Axes.imshow = spy
  try:
    stability.plot(rows, tmp_path / "s.png")
  finally:
    matplotlib.axes.Axes.imshow = orig
  np.testing.assert_array_equal(captured["data"],
                                [[1.0, stability.RELATIVE_MAX, np.nan]])
