"""The ``pyfusion`` command line end to end: demo / fuse / sweep in subprocesses on tiny data, error exit codes
and messages, the README's demo command, the benchmark runner, and the input readers."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyfusion
from pyfusion.cli import build_parser, main
from pyfusion.cli._console import CLIError
from pyfusion.cli.inputs import load_data, parse_factory
from pyfusion.cli.report import Row, format_row

ROOT = Path(__file__).resolve().parent.parent
SIZES = [64, 32, 32, 10]  # the --fast demo's MLP on digits
FACTORY = f"pyfusion.models:mlp(sizes={SIZES})"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-m", "pyfusion", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def table_lines(stdout: str) -> list[list[str]]:
    """The cells of every table row printed on stdout (columns are separated by two or more spaces)."""
    rows = []
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 7 and not set(cells[0]) <= {"-"}:
            rows.append(cells)
    return rows[1:]  # drop the header


def read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def rows_of(report: dict) -> list[Row]:
    return [Row(**r) for r in report["rows"]]


def assert_table_matches_json(stdout: str, report: dict) -> None:
    printed = table_lines(stdout)
    expected = [list(format_row(r)) for r in rows_of(report)]
    assert printed == expected


def digits_test_accuracy(model: torch.nn.Module) -> float:
    from pyfusion.data import load_digits, make_loader
    from pyfusion.train import evaluate

    x, y = load_digits("test")
    return evaluate(model, make_loader(x, y, batch_size=512))


def load_member(path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    from pyfusion.models import mlp

    model = mlp(SIZES)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def readme_demo_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.+?)\n```", quick, re.S)
    assert block, "the README's quick start must start with a bash block"
    parts = [p.strip() for p in block.group(1).split("&&")]
    demo = [p for p in parts if re.match(r"\S*pyfusion demo\b", p)]
    assert len(demo) == 1, f"the first quick-start command must run `pyfusion demo`; got {parts}"
    return shlex.split(demo[0])[1:]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's demo command, run in fast mode (one subprocess shared by the tests below)."""
    out = tmp_path_factory.mktemp("demo") / "report"
    proc = run_cli(*readme_demo_command(), "--fast", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


# --------------------------------------------------------------------------------------------- demo
def test_demo_fast_writes_readable_report(demo):
    out, proc = demo
    report = read_report(out)
    assert report["command"] == "demo" and report["settings"]["fast"] is True
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds.count("member") == 2 and kinds.count("ensemble") == 1 and kinds.count("fused") >= 2
    # CSV: same rows and values as the JSON.
    with (out / "report.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["method"] for r in csv_rows] == [r["method"] for r in report["rows"]]
    for c, j in zip(csv_rows, report["rows"]):
        assert float(c["accuracy"]) == pytest.approx(j["accuracy"], rel=1e-12)
        assert float(c["flops"]) == pytest.approx(j["flops"], rel=1e-12)
    # The plot is a real PNG image of the expected size.
    import matplotlib.image

    img = matplotlib.image.imread(str(out / "tradeoff.png"))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    # Members are saved as plain state dicts, as the printed fuse command expects.
    assert sorted(p.name for p in (out / "members").iterdir()) == ["member_0.safetensors", "member_1.safetensors"]
    assert "pyfusion fuse" in proc.stderr


def test_demo_table_matches_json(demo):
    out, proc = demo
    assert_table_matches_json(proc.stdout, read_report(out))


def test_demo_numbers_are_measured(demo):
    """Member and ensemble accuracies, FLOPs and parameters recomputed independently from the saved members."""
    from pyfusion.data import load_digits, make_loader
    from pyfusion.train import ensemble_accuracy

    out, _ = demo
    rows = {r.method: r for r in rows_of(read_report(out))}
    members = [load_member(out / "members" / f"member_{k}.safetensors") for k in range(2)]
    dense_flops = 2 * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
    n_params = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
    for k, m in enumerate(members):
        r = rows[f"member {k}"]
        assert r.accuracy == pytest.approx(digits_test_accuracy(m), abs=1e-12)
        assert r.flops == dense_flops and r.params == n_params
        assert r.latency_ms > 0 and r.fusion_s is None
    x, y = load_digits("test")
    ens = rows["ensemble"]
    assert ens.accuracy == pytest.approx(ensemble_accuracy(members, make_loader(x, y, batch_size=512)), abs=1e-12)
    assert ens.flops == 2 * dense_flops and ens.alpha == 1.0
    # Full fusion has the cost of one member.
    avg = rows["average"]
    assert avg.flops == pytest.approx(dense_flops) and avg.fusion_s is not None and avg.fusion_s >= 0
    # Partial fusion at alpha = 1 is exactly the ensemble; at alpha = 0 it costs one member.
    partial = {r.alpha: r for r in rows_of(read_report(out)) if r.method == "partial"}
    assert partial[1.0].accuracy == pytest.approx(ens.accuracy, abs=1e-12) and partial[1.0].flops == ens.flops
    assert partial[0.0].flops == dense_flops and dense_flops < partial[0.5].flops < 2 * dense_flops
    # Trained members beat chance clearly (10 classes).
    assert min(rows["member 0"].accuracy, rows["member 1"].accuracy) > 0.5


# --------------------------------------------------------------------------------------------- fuse
def test_fuse_average_writes_loadable_model(demo, tmp_path):
    out, _ = demo
    files = [str(out / "members" / f"member_{k}.safetensors") for k in range(2)]
    target = tmp_path / "fused.safetensors"
    proc = run_cli("fuse", *files, "--model", FACTORY, "--data", "digits", "--method", "average", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert f"fused model: {target}" in proc.stdout
    fused = pyfusion.load(target)
    members = [load_member(Path(f)) for f in files]
    # Vanilla averaging: every tensor is the mean of the members' tensors.
    sd = fused.state_dict()
    for key, value in members[0].state_dict().items():
        torch.testing.assert_close(sd[key], (value + members[1].state_dict()[key]) / 2)
    printed = {cells[0]: cells for cells in table_lines(proc.stdout)}
    assert printed["average"][2] == f"{100 * digits_test_accuracy(fused):.2f}"


def test_fuse_partial_saves_the_fast_modules(demo, tmp_path):
    out, _ = demo
    files = [str(out / "members" / f"member_{k}.safetensors") for k in range(2)]
    target = tmp_path / "partial.safetensors"
    proc = run_cli(
        "fuse",
        *files,
        "--model",
        FACTORY,
        "--data",
        "digits",
        "--method",
        "partial",
        "--alpha",
        "0.5",
        "--features",
        "weights",
        "-o",
        str(target),
    )
    assert proc.returncode == 0, proc.stderr
    fused = pyfusion.load(target)
    x = torch.rand(4, 1, 8, 8)
    c = pyfusion.cost(fused, x)
    printed = {cells[0]: cells for cells in table_lines(proc.stdout)}
    row = printed["partial(features=weights)"]
    assert row[1] == "0.50" and row[2] == f"{100 * digits_test_accuracy(fused):.2f}"
    assert row[3] == format_row(Row("fused", "", 0.5, 0.0, c.flops, c.params, 0.0))[3]
    assert c.flops < c.dense_flops  # zero blocks are not stored, not counted


# --------------------------------------------------------------------------------------------- sweep
def test_sweep_report_and_alpha_one_is_the_ensemble(demo, tmp_path):
    out, _ = demo
    files = [str(out / "members" / f"member_{k}.safetensors") for k in range(2)]
    methods = "partial,average"
    rep = tmp_path / "sweep"
    proc = run_cli(
        "sweep",
        *files,
        "--model",
        FACTORY,
        "--data",
        "digits",
        "--methods",
        methods,
        "--alphas",
        "0,1",
        "--out",
        str(rep),
    )
    assert proc.returncode == 0, proc.stderr
    report = read_report(rep)
    assert_table_matches_json(proc.stdout, report)
    assert (rep / "tradeoff.png").stat().st_size > 1000
    rows = rows_of(report)
    fused = [r for r in rows if r.kind == "fused"]
    ens = next(r for r in rows if r.kind == "ensemble")
    assert [(r.method, r.alpha) for r in fused] == [("partial", 0.0), ("partial", 1.0), ("average", 0.0)]
    at_one = fused[1]
    # alpha = 1 is exactly the ensemble: same predictions, same effective cost.
    assert at_one.accuracy == pytest.approx(ens.accuracy, abs=1e-12)
    assert at_one.flops == pytest.approx(ens.flops, rel=1e-9)
    assert fused[0].flops < at_one.flops


# --------------------------------------------------------------------------------------------- README
def test_readme_demo_command_parses_and_runs_fast(demo):
    args = readme_demo_command()
    assert args[0] == "demo"
    parsed = build_parser().parse_args(args)
    assert parsed.command == "demo"
    out, proc = demo  # the fixture ran exactly these arguments plus --fast --out
    assert proc.returncode == 0
    assert (out / "report.json").is_file() and (out / "tradeoff.png").is_file()


def test_readme_install_part_equals_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"TEST_COMMAND='([^']+)'", ci).group(1)
    install = test_command.split(" && .venv/bin/python -m pytest")[0]
    text = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.+?)\n```", text[text.index("## Quick start") :], re.S).group(1)
    assert first.startswith(install + " && ")


# --------------------------------------------------------------------------------------------- errors
@pytest.fixture
def members(demo) -> list[str]:
    out, _ = demo
    return [str(out / "members" / f"member_{k}.safetensors") for k in range(2)]


def fuse_args(files: list[str], tmp_path: Path, *extra: str, model: str | None = FACTORY) -> list[str]:
    args = ["fuse", *files, "--data", "digits", "--method", "average", "-o", str(tmp_path / "f.safetensors")]
    return args + (["--model", model] if model else []) + list(extra)


def assert_one_line_error(capsys, code: int, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("pyfusion ")]
    assert len(errors) == 1 and "error:" in errors[0], err
    assert "Traceback" not in err
    assert any(ln.strip().startswith("hint:") for ln in lines), err
    for n in needles:
        assert n in errors[0], err
    return errors[0]


def test_missing_member_file_exit_3(members, tmp_path, capsys):
    rc = main(fuse_args([members[0], str(tmp_path / "nope.safetensors")], tmp_path))
    assert_one_line_error(capsys, 3, rc, "nope.safetensors", "does not exist")
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize(
    ("factory", "code", "needle"),
    [
        ("pyfusion.models.mlp", 2, "module:function"),
        ("pyfusion.models:mlp(sizes=__import__('os'))", 2, "literals"),
        ("pyfusion.models:mlp(sizes=[64", 2, "parenthesis"),
        ("no_such_module_xyz:build", 3, "cannot import"),
        ("pyfusion.models:no_such_factory", 3, "no attribute"),
        ("pyfusion.models:mlp(sizes=[64, 32, 10])", 3, "does not fit"),
    ],
)
def test_bad_factory(members, tmp_path, capsys, factory, code, needle):
    rc = main(fuse_args(members, tmp_path, model=factory))
    assert_one_line_error(capsys, code, rc, needle)


def test_mismatched_members_exit_3(tmp_path, capsys):
    from pyfusion.models import mlp

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pyfusion.save(mlp([64, 32, 10]), a)
    pyfusion.save(mlp([64, 16, 10]), b)
    rc = main(fuse_args([str(a), str(b)], tmp_path, model=None))
    assert_one_line_error(capsys, 3, rc, "different shapes", "a.safetensors", "b.safetensors")


def test_plain_state_dict_without_model_exit_3(members, tmp_path, capsys):
    """The README's table: a member file that cannot be read as a model is bad input (3), not usage (2)."""
    rc = main(fuse_args(members, tmp_path, model=None))
    assert_one_line_error(capsys, 3, rc, "needs the architecture")


def test_pickled_object_is_refused(tmp_path, capsys, members):
    evil = tmp_path / "member.pt"
    torch.save({"w": torch.zeros(2), "obj": Row}, evil)  # a class object needs full unpickling
    rc = main(fuse_args([members[0], str(evil)], tmp_path))
    assert_one_line_error(capsys, 3, rc, "member.pt")


def test_usage_errors_exit_2(members, tmp_path, capsys):
    rc = main(fuse_args(members, tmp_path, "--alpha", "1.5"))
    assert_one_line_error(capsys, 2, rc, "outside [0, 1]")
    rc = main(fuse_args(members, tmp_path, "--lambdas", "0.2,0.3,0.5"))
    assert_one_line_error(capsys, 2, rc, "3 values for 2 members")
    rc = main(["fuse", *members, "--model", FACTORY, "--data", "digits", "--method", "no_such_method", "-o", "x"])
    assert_one_line_error(capsys, 2, rc, "no_such_method")
    assert main(["demo", "--no-such-flag"]) == 2
    assert main(["demo", "--quiet", "--verbose"]) == 2


def test_bad_data_exit_3(members, tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((4, 1, 8, 8), np.nan, np.float32))
    args = fuse_args(members, tmp_path)
    args[args.index("digits")] = str(bad)
    rc = main(args)
    assert_one_line_error(capsys, 3, rc, "NaN")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 5), np.float32))  # 5 features, the members read 64
    args[args.index(str(bad))] = str(wrong)
    rc = main(args)
    assert_one_line_error(capsys, 3, rc, "cannot run on data")


def test_unwritable_output_exit_5(members, tmp_path, capsys):
    args = fuse_args(members, tmp_path)
    args[args.index("-o") + 1] = str(tmp_path / "missing_dir" / "f.safetensors")
    rc = main(args)
    assert_one_line_error(capsys, 5, rc, "does not exist")


def test_subprocess_error_is_one_line_and_verbose_adds_traceback(tmp_path):
    proc = run_cli(
        "fuse",
        str(tmp_path / "a.pt"),
        str(tmp_path / "b.pt"),
        "--data",
        "digits",
        "--method",
        "average",
        "-o",
        str(tmp_path / "f.safetensors"),
    )
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.splitlines()[0].startswith("pyfusion fuse: error: member file")
    assert "Traceback" not in proc.stderr


def test_quiet_prints_nothing(members, tmp_path, capsys):
    # activation matching runs the library's own progress bar over calibration batches: silenced as well
    args = fuse_args(members, tmp_path, "--quiet")
    args[args.index("average")] = "activation_matching"
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == "" and captured.err == ""
    assert (tmp_path / "f.safetensors").is_file()


# --------------------------------------------------------------------------------------------- bench
def test_bench_runs_scripts_prints_tables_and_reports_failures(tmp_path, capsys):
    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    committed = bench / "results" / "ok.md"
    committed.write_text("| shape | ms |\n|---|---|\n| full run | 9.0 |\n")
    (bench / "bench_ok.py").write_text(  # bench/common.py's convention: quick output goes to $PYFUSION_BENCH_OUT
        "import os, pathlib, sys\n"
        "quick = sys.argv[1:] == ['--quick']\n"
        "here = pathlib.Path(__file__).parent\n"
        "folder = pathlib.Path(os.environ['PYFUSION_BENCH_OUT']) if quick else here / 'results'\n"
        "out = folder / 'ok.md'\n"
        "out.write_text('| shape | ms |\\n|---|---|\\n| ' + ('tiny' if quick else 'full run') + ' | 1.0 |\\n')\n"
        "print('wrote', out)\n"
    )
    (bench / "bench_broken.py").write_text("raise SystemExit('broken on purpose')\n")
    assert main(["bench", "--bench-dir", str(bench), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["broken", "ok"]
    assert main(["bench", "ok", "--bench-dir", str(bench)]) == 0
    assert "| tiny | 1.0 |" in capsys.readouterr().out
    # the quick run's table was printed, and the committed full-run table is back in place
    assert committed.read_text() == "| shape | ms |\n|---|---|\n| full run | 9.0 |\n"
    rc = main(["bench", "--bench-dir", str(bench)])
    captured = capsys.readouterr()
    assert rc == 6 and "| tiny | 1.0 |" in captured.out
    assert "bench_broken.py failed: broken on purpose" in captured.err
    assert main(["bench", "ok", "--full", "--bench-dir", str(bench)]) == 0
    assert "| full run | 1.0 |" in committed.read_text()
    capsys.readouterr()
    assert main(["bench", "nope", "--bench-dir", str(bench)]) == 2
    assert main(["bench", "--bench-dir", str(tmp_path / "empty")]) == 3


# --------------------------------------------------------------------------------------------- readers
def test_load_data_file_formats(tmp_path):
    from safetensors.torch import save_file

    x = torch.rand(6, 1, 8, 8)
    y = torch.arange(6) % 3
    torch.save((x, y), tmp_path / "t.pt")
    torch.save({"inputs": x, "labels": y}, tmp_path / "d.pt")
    np.save(tmp_path / "a.npy", x.numpy())
    np.savez(tmp_path / "z.npz", x=x.numpy(), y=y.numpy())
    save_file({"x": x, "y": y}, tmp_path / "s.safetensors")
    for name, has_y in [("t.pt", True), ("d.pt", True), ("a.npy", False), ("z.npz", True), ("s.safetensors", True)]:
        ds = load_data(str(tmp_path / name))
        torch.testing.assert_close(ds.x, x)
        assert (ds.y is not None) == has_y
        if has_y:
            assert torch.equal(ds.y, y)
    torch.save((x, torch.arange(5)), tmp_path / "bad.pt")
    with pytest.raises(CLIError, match=r"labels must be integers of shape \(6,\)") as e:
        load_data(str(tmp_path / "bad.pt"))
    assert e.value.code == 3
    with pytest.raises(CLIError, match="needs the directory") as e:
        load_data("mnist")
    assert e.value.code == 2
    ds = load_data("digits", "test")
    assert ds.x.shape[1:] == (1, 8, 8) and ds.y is not None and ds.x.shape[0] == ds.y.shape[0]


def test_parse_factory_literals():
    f = parse_factory("pyfusion.models:mlp([64, 8, 10], activation='tanh', bias=False)")
    assert (f.module, f.function, f.args, f.kwargs) == (
        "pyfusion.models",
        "mlp",
        ([64, 8, 10],),
        {"activation": "tanh", "bias": False},
    )
    model = f.build()
    assert isinstance(model[1], torch.nn.Linear) and model[1].bias is None and model[1].out_features == 8
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_report_cost_counts_stored_blocks_of_partial_layers():
    from pyfusion.cli.measure import model_cost as layer_cost
    from pyfusion.nn import PartialLinear

    # Layout [shared | b1 | b2]: in [4, 2, 2], out [3, 2, 2]. Shared rows read all 8 inputs (3 x 8), branch k's
    # rows read the shared and their own inputs (2 x 6 each): 48 stored weights of the dense 7 x 8 = 56.
    layer = PartialLinear([4, 2, 2], [3, 2, 2])
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), layer)
    c = layer_cost(model, torch.rand(6, 5))
    assert c.flops == 2 * (5 * 8) + 2 * 48
    assert c.dense_flops == 2 * (5 * 8) + 2 * 56
    assert c.params == (5 * 8 + 8) + (48 + 7)
    assert c.dense_params == (5 * 8 + 8) + (56 + 7)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 25, 2))
    c = layer_cost(conv, torch.rand(2, 3, 5, 5))
    assert c.flops == c.dense_flops == 2 * (25 * 4 * 3 * 9) + 2 * (100 * 2)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.+?)\n```", text, re.S).group(1)
    assert len([ln for ln in code.splitlines() if ln.strip()]) == 5  # five lines of code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    fused = scope["fused"]
    assert scope["logits"].shape == (32, 10)
    # what the text under the example promises: save / load round trip with identical outputs
    same = pyfusion.load(pyfusion.save(fused, tmp_path / "fused.safetensors"))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(same(x), fused(x), rtol=0, atol=0)


def test_help_lists_exit_codes_and_info_runs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "fuse", "sweep", "bench", "info"):
        assert cmd in out
    assert "exit codes:" in out and "3    bad input" in out
    assert main([]) == 2
    assert main(["info"]) == 0
    assert "backends:" in capsys.readouterr().out


def test_unknown_option_exit_2_lists_the_method_options(members, tmp_path, capsys):
    from pyfusion.cli.tradeoff import method_options

    rc = main(fuse_args(members, tmp_path, "--option", "no_such_option=3"))
    assert_one_line_error(capsys, 2, rc, "method average has no option 'no_such_option'")
    args = fuse_args(members, tmp_path, "--option", "no_such_option=3")
    args[args.index("average")] = "partial"
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2
    hint = next(ln for ln in err.splitlines() if "hint:" in ln)
    assert hint.strip() == f"hint: partial takes the options: {', '.join(method_options('partial'))}"
    assert "alpha" in hint and "features" in hint and "repair" in hint
    assert not (tmp_path / "f.safetensors").exists()


# --------------------------------------------------------------------------------------------- hardening (issue 16)
@pytest.fixture(scope="module")
def random_members(tmp_path_factory) -> list[str]:
    """Three untrained members of the --fast demo's MLP as plain state dicts (for tests that need no accuracy)."""
    from safetensors.torch import save_file

    from pyfusion.models import mlp

    folder = tmp_path_factory.mktemp("random_members")
    paths = []
    for k in range(3):
        torch.manual_seed(100 + k)
        path = folder / f"m{k}.safetensors"
        save_file({n: t.contiguous() for n, t in mlp(SIZES).state_dict().items()}, str(path))
        paths.append(str(path))
    return paths


def quick(*extra: str) -> list[str]:
    """Small, fast settings for in-process runs."""
    return ["--calib-samples", "64", "--eval-samples", "64", "--repeats", "1", "--latency-batch", "8", *extra]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--batch-size", "0"), "argument --batch-size: must be an integer >= 1; got 0"),
        (("--calib-samples", "0"), "argument --calib-samples: must be an integer >= 1; got 0"),
        (("--calib-samples", "-5"), "argument --calib-samples: must be an integer >= 1; got -5"),
        (("--eval-samples", "0"), "argument --eval-samples: must be an integer >= 1; got 0"),
        (("--repeats", "0"), "argument --repeats: must be an integer >= 1; got 0"),
        (("--latency-batch", "0"), "argument --latency-batch: must be an integer >= 1; got 0"),
        (("--batch-size", "x"), "must be an integer >= 1; got 'x'"),
        (("--alpha", "0.5,1.5"), "--alpha: 1.5 is outside [0, 1]"),
        (("--alpha", "nan"), "--alpha: nan is outside [0, 1]"),
        (("--alpha", '{"1": 1.5}'), "--alpha: 1.5 is outside [0, 1]"),
        (("--alpha", '{"1": "a"}'), "is not a JSON object of numbers"),
        (("--alpha", '{"no_such_group": 0.5}'), "--alpha names unknown neuron groups ['no_such_group']"),
        (("--alpha", "0.5,0.5,0.5,0.5,0.5"), "--alpha has 5 values for 2 neuron groups"),
        (("--lambdas", "0.7,0.7"), "lambdas must sum to 1"),
        (("--lambdas=-0.5,1.5",), "lambdas must be finite and non-negative"),
        (("--lambdas", "0.5,nan"), "lambdas must be finite and non-negative"),
        (("--option", "no_such_option=1"), "method partial has no option 'no_such_option'"),
        (("--option", "iterations=50"), "method partial has no option 'iterations'"),
        (("--normalize", "0.5"), "--normalize '0.5': expected MEAN,STD"),
        (("--normalize", "0.5,0"), "stds finite and > 0"),
        (("--normalize", "0.1,0.2/0.3"), "2 means but 1 stds"),
        (("--normalize", "0.1,0.2/0.3,0.4"), "--normalize gives 2 channels, but the inputs of 'digits/train' have 1"),
    ],
)
def test_usage_errors_exit_2_with_one_line(members, tmp_path, capsys, extra, needle):
    args = fuse_args(members, tmp_path, *extra)
    args[args.index("average")] = "partial"
    rc = main(args)
    assert_one_line_error(capsys, 2, rc, needle)
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--repeats", "0"],
        ["demo", "--epochs", "0"],
        ["demo", "--lr", "0"],
        ["demo", "--members", "1"],
        ["demo", "--threads", "0"],
        ["demo", "--alphas", "0,2"],
        ["sweep", "a", "b", "--data", "digits", "--alphas", "0,1.5"],
        ["sweep", "a", "b", "--data", "digits", "--methods", "partial(no_such_option=1)"],
        ["sweep", "a", "b", "--data", "digits", "--methods", "hf", "--repeats", "-1"],
        ["sweep", "a", "--data", "digits", "--methods", "partial"],  # partial needs 2 members
        ["fuse", "a", "b", "--data", "digits", "--method", "average"],  # --output missing
    ],
)
def test_usage_errors_before_any_work(args, capsys):
    """Refused (2, one line and a hint) before member files are even opened: 'a' and 'b' do not exist."""
    rc = main(args)
    assert_one_line_error(capsys, 2, rc)


def test_sweep_keeps_going_when_a_method_fails(random_members, tmp_path, capsys, monkeypatch):
    """A method that raises (hf, made to fail here: it fuses any K since issue 13) is reported as failed; partial and
    average are still measured and reported."""
    from pyfusion.fuse.interp import driver

    def fail(self):
        raise ValueError("hf refuses these members (test)")

    monkeypatch.setattr(driver._Interp, "run", fail)
    rep = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            *random_members,
            "--model",
            FACTORY,
            "--data",
            "digits",
            "--methods",
            "partial,hf,average",
            "--alphas",
            "0,1",
            "--out",
            str(rep),
            *quick(),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 4, captured.err
    report = read_report(rep)
    assert_table_matches_json(captured.out, report)
    fused = [r for r in rows_of(report) if r.kind == "fused"]
    assert [(r.method, r.alpha, r.error is None) for r in fused] == [
        ("partial", 0.0, True),
        ("partial", 1.0, True),
        ("hf", 0.0, False),
        ("average", 0.0, True),
    ]
    failed = fused[2]
    assert "refuses these members" in failed.error and failed.accuracy is None  # NaN is written as null
    assert report["failures"] == [{"method": "hf", "alpha": 0.0, "error": failed.error}]
    printed = {(c[0], c[1]): c for c in table_lines(captured.out)}
    assert printed[("hf", "0.00")][2:] == ["failed", "-", "-", "-", "-"]
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("pyfusion sweep: error:")]
    assert len(errors) == 1 and "1 of 4 fusion points failed" in errors[0]
    assert (rep / "tradeoff.png").stat().st_size > 1000


def test_normalize_and_calibration_choice_are_applied_and_recorded(members, tmp_path, capsys):
    from pyfusion.cli.measure import accuracy
    from pyfusion.data import load_digits

    rep = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            *members,
            "--model",
            FACTORY,
            "--data",
            "digits",
            "--methods",
            "average",
            "--alphas",
            "0",
            "--normalize",
            "0.25,0.5",
            "--calib-samples",
            "100",
            "--calib-sampling",
            "random",
            "--seed",
            "3",
            "--eval-samples",
            "200",
            "--repeats",
            "1",
            "--out",
            str(rep),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = read_report(rep)
    settings = report["settings"]
    assert settings["normalize"] == {"mean": [0.25], "std": [0.5]}
    cal = settings["calibration"]
    assert (cal["samples"], cal["selection"], cal["seed"], cal["data"]) == (100, "random", 3, "digits")
    assert cal["available"] == load_digits("train")[0].shape[0] and cal["eval_samples"] == 200
    # the members' accuracy in the report is on the normalized evaluation data
    x, y = load_digits("test")
    x, y = (x[:200] - 0.25) / 0.5, y[:200]
    rows = {r.method: r for r in rows_of(report)}
    for k in range(2):
        assert rows[f"member {k}"].accuracy == pytest.approx(accuracy(load_member(Path(members[k])), x, y, 64))
    raw = accuracy(load_member(Path(members[0])), x * 0.5 + 0.25, y, 64)
    assert rows["member 0"].accuracy != pytest.approx(raw)  # (the normalization changes the numbers here)


def test_calibration_sampling_first_and_random():
    from pyfusion.cli.inputs import Dataset

    ds = Dataset("d", torch.arange(20.0).reshape(10, 2), torch.arange(10))
    assert torch.equal(ds.sample(4, "first").y, torch.arange(4))
    r = ds.sample(4, "random", seed=3)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3))[:4]
    assert torch.equal(r.y, expected) and torch.equal(r.x, ds.x[expected])
    assert not torch.equal(ds.sample(4, "random", seed=4).y, r.y)
    assert ds.sample(None, "random").x.shape == (10, 2)
    per_channel = Dataset("c", torch.ones(2, 3, 2, 2), None).normalized([1.0, 0.0, 0.5], [1.0, 2.0, 0.25])
    assert per_channel.x[:, 0].eq(0).all() and per_channel.x[:, 1].eq(0.5).all() and per_channel.x[:, 2].eq(2).all()


def test_fuse_one_member_for_methods_that_prune_one_network(random_members, tmp_path, capsys):
    target = tmp_path / "pruned.safetensors"
    rc = main(
        [
            "fuse",
            random_members[0],
            "--model",
            FACTORY,
            "--data",
            "digits",
            "--method",
            "prune",
            "--option",
            "width=0.5",
            "-o",
            str(target),
            *quick(),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    printed = [c[0] for c in table_lines(captured.out)]
    assert printed == ["member 0", "prune(width=0.5)"]  # no ensemble of one
    pruned = pyfusion.load(target)
    c = pyfusion.cost(pruned, torch.rand(2, 1, 8, 8))
    assert c.flops < 2 * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:]))
    rc = main(
        ["fuse", random_members[0], "--model", FACTORY, "--data", "digits", "--method", "partial", "-o", str(target)]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "method partial needs at least 2 members; got 1" in err
    from pyfusion.fuse.registry import available_methods, get_method

    single = [n for n in available_methods() if get_method(n).min_members == 1]
    assert {"cluster", "prune"} <= set(single)
    assert f"the methods that take 1: {', '.join(single)}" in err


_CUSTOM_MODELS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CumNet(Net):
    def forward(self, x):  # a Fourier transform over the features mixes neurons: the tracer refuses it
        return self.fc2(torch.fft.fft(torch.relu(self.fc1(x.flatten(1))), dim=1).real)
"""


@pytest.fixture
def custom_members(tmp_path, monkeypatch):
    """Members of user classes (a module written to tmp_path, importable as --model cli_custom_models:...)."""
    from safetensors.torch import save_file

    (tmp_path / "cli_custom_models.py").write_text(_CUSTOM_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod = importlib.import_module("cli_custom_models")
    paths = []
    for k in range(2):
        torch.manual_seed(k)
        path = tmp_path / f"net{k}.safetensors"
        save_file({n: t.contiguous() for n, t in mod.Net().state_dict().items()}, str(path))
        paths.append(str(path))
    return paths


def test_unsupported_operation_hint_does_not_list_method_options(custom_members, tmp_path, capsys):
    rc = main(fuse_args(custom_members, tmp_path, *quick(), model="cli_custom_models:CumNet"))
    line = assert_one_line_error(capsys, 4, rc, "fusion with average failed")
    assert "fft" in line
    rc = main(fuse_args(custom_members, tmp_path, *quick(), model="cli_custom_models:CumNet"))
    hint = next(ln for ln in capsys.readouterr().err.splitlines() if "hint:" in ln)
    assert "declare_groups" in hint and "options" not in hint


def test_fused_user_class_is_saved_and_loads_with_its_factory(custom_members, tmp_path, capsys):
    """A member class of the user's own (--model module:Class) is saved as its member architecture + changes."""
    import cli_custom_models

    target = tmp_path / "f.safetensors"
    target.write_bytes(b"previous file")
    rc = main(fuse_args(custom_members, tmp_path, *quick(), model="cli_custom_models:Net"))
    assert rc == 0, capsys.readouterr().err
    with pytest.raises(pyfusion.serialization.SerializationError, match=r"cli_custom_models\.Net.*factory=Net"):
        pyfusion.load(target)
    fused = pyfusion.load(target, factory=cli_custom_models.Net)
    assert isinstance(fused, cli_custom_models.Net) and fused.fusion_checksum == "verified"
    from safetensors.torch import load_file

    states = [load_file(path) for path in custom_members]
    for name, p in fused.state_dict().items():  # average of two members: every tensor is their mean
        torch.testing.assert_close(p, (states[0][name] + states[1][name]) / 2)


def test_unsaveable_model_exit_5_says_so(custom_members, tmp_path, capsys, monkeypatch):
    """A model pyfusion.save cannot describe (simulated: the member-architecture encoder refuses it) is exit 5 with the
    hint to register its class; the previous file stays."""
    from pyfusion import _member_files

    def refuse(module, factory):
        raise pyfusion.serialization.SerializationError(
            "cannot save module 'fc1' of type cli_custom_models.Odd: it is not in the member architecture at that path"
        )

    monkeypatch.setattr(_member_files, "encode", refuse)
    target = tmp_path / "f.safetensors"
    target.write_bytes(b"previous file")
    rc = main(fuse_args(custom_members, tmp_path, *quick(), model="cli_custom_models:Net"))
    assert_one_line_error(capsys, 5, rc, "cannot save the fused model", "cli_custom_models.Odd")
    rc = main(fuse_args(custom_members, tmp_path, *quick(), model="cli_custom_models:Net"))
    hint = next(ln for ln in capsys.readouterr().err.splitlines() if "hint:" in ln)
    assert "register_module" in hint and "disk space" not in hint
    assert target.read_bytes() == b"previous file"


def test_failed_reload_check_keeps_the_previous_output(random_members, tmp_path, capsys, monkeypatch):
    """The reloaded file gives other outputs (simulated): exit 5 and the old file at --output is untouched."""
    import pyfusion.serialization as ser

    real_load = ser._load

    def perturbed(*args, **kwargs):
        module = real_load(*args, **kwargs)
        with torch.no_grad():
            next(module.parameters()).add_(1.0)
        return module

    monkeypatch.setattr(ser, "_load", perturbed)
    monkeypatch.setattr(ser, "_same_contents", lambda *a: None)  # only the CLI's output check stands in the way
    target = tmp_path / "f.safetensors"
    target.write_bytes(b"previous file")
    rc = main(fuse_args(random_members[:2], tmp_path, *quick()))
    assert_one_line_error(capsys, 5, rc, "the reloaded model differs from the fused one")
    assert target.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_help_option_example_works(random_members, tmp_path, capsys):
    assert main(["fuse", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    example = re.search(r"e\.g\. --method (\w+) --option (\w+=\w+)", text)
    assert example, text
    target = tmp_path / "f.safetensors"
    rc = main(
        [
            "fuse",
            *random_members[:2],
            "--model",
            FACTORY,
            "--data",
            "digits",
            "--method",
            example.group(1),
            "--option",
            example.group(2),
            "-o",
            str(target),
            *quick(),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert target.is_file()


def test_kf_hint_lists_the_options_of_kf(members, tmp_path, capsys):
    """The hint lists what the registered kf declares (its own options first), then fuse()'s keywords."""
    import inspect

    from pyfusion.fuse.registry import get_method

    args = fuse_args(members, tmp_path, "--option", "no_such_option=1")
    args[args.index("average")] = "kf"
    rc = main(args)
    assert_one_line_error(capsys, 2, rc, "method kf has no option 'no_such_option'")
    rc = main(args)
    hint = next(ln for ln in capsys.readouterr().err.splitlines() if "hint:" in ln)
    listed = hint.split("kf takes the options:")[1].strip().split(", ")
    params = inspect.signature(get_method("kf").fn).parameters.values()
    own = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "config"]
    assert {"importance", "n_restarts", "ridge"} <= set(own)  # kf's real options (neuron interpolation)
    assert listed[: len(own)] == own
    assert "repair" in listed[len(own) :] and "iterations" not in listed


def test_time_interleaved_alternates_and_takes_medians(monkeypatch):
    from pyfusion.cli import measure

    calls: list[str] = []
    clock = iter(range(1000))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: float(next(clock)))

    def make(name):
        def fn(x):
            calls.append(name)
            if name == "b":  # b takes one extra tick per call: 2 ticks instead of 1
                next(clock)

        return fn

    lat = measure.time_interleaved([make("a"), make("b")], torch.zeros(1), repeats=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # alternating order, warm-up first
    assert lat == [1000.0, 2000.0]  # ms: medians of the timed passes only


def test_report_latency_is_interleaved_with_the_ensemble(members, tmp_path, capsys):
    rep = tmp_path / "sweep"
    rc = main(
        [
            "sweep",
            *members,
            "--model",
            FACTORY,
            "--data",
            "digits",
            "--methods",
            "partial",
            "--alphas",
            "0.5",
            "--out",
            str(rep),
            *quick("--repeats", "3"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = read_report(rep)
    assert "alternate with the ensemble's in the same loop" in report["latency"]
    rows = rows_of(report)
    ens = next(r for r in rows if r.kind == "ensemble")
    assert ens.ensemble_latency_ms == ens.latency_ms
    for r in rows:
        assert r.latency_ms > 0 and r.ensemble_latency_ms > 0


def test_readme_exit_code_table_matches_the_cli():
    from pyfusion.cli import _console

    text = (ROOT / "README.md").read_text()
    table = text[text.index("Exit codes (also in `pyfusion --help`)") :]
    readme = [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)]
    cli = [int(m) for m in re.findall(r"^  (\d+) ", _console.EXIT_CODES_HELP, re.M)]
    constants = sorted(v for k, v in vars(_console).items() if k.startswith("EXIT_") and isinstance(v, int))
    assert readme == cli == constants == [0, 1, 2, 3, 4, 5, 6, 130]


def test_members_saved_before_checksums_load_with_a_note(tmp_path, capsys):
    from pyfusion.models import mlp

    files = []
    for k in range(2):
        path = pyfusion.save(mlp(SIZES), tmp_path / f"m{k}.safetensors")
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        del header["__metadata__"]["checksum"]  # what pyfusion wrote before checksums
        raw = json.dumps(header).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
        files.append(str(path))
    rc = main(fuse_args(files, tmp_path, *quick(), model=None))
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [ln for ln in err.splitlines() if "has no checksum" in ln]
    assert len(notes) == 2 and all(ln.startswith("note: ") for ln in notes)
    assert "Warning" not in err
