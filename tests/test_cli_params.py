import json
import subprocess
import sys

import pytest

from finemoe.cli import main


def test_params_json_matches_paper(capsys):
    assert main(["params", "--d-model", "512", "--n-blocks", "8", "--expansion-rate", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["active_params"] == 25_165_824
    assert out["total_params"] == 1_082_130_432
    assert out["router_params"] == 512 * 64 * 8
    assert out["n_experts"] == 64 and out["expert_width"] == 2048
    assert out["flops_per_token"] == 72 * 512**2 * 8 + 14 * 512 * 64 * 8


def test_bad_granularity_is_one_line_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "finemoe", "params", "--d-model", "256", "--n-blocks", "4", "-G", "3"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "granularity" in r.stderr


def test_argparse_mistakes_are_one_line_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "finemoe", "params", "--d-model", "-5", "--n-blocks", "2"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--d-model" in r.stderr and "--help" in r.stderr


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["params", "--d-model", "8", "--n-blocks", "1", "--top-k"], "finemoe params"),
        (["bench", "moe-layer", "--bar"], "finemoe bench moe-layer"),
        (["sweep", "run", "quickstart", "--nope"], "finemoe sweep run"),
    ],
)
def test_an_unknown_option_is_blamed_on_its_subcommand(capsys, argv, prog):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: unrecognized arguments: {argv[-1]}") and f"`{prog} --help`" in err


def test_closed_output_pipe_ends_quietly(monkeypatch, capsys):
    """`finemoe params ... | head -0`: exit 141 like a Unix tool, not a BrokenPipeError traceback."""
    import os
    import sys

    r, w = os.pipe()
    os.close(r)
    with capsys.disabled():
        monkeypatch.setattr(sys, "stdout", os.fdopen(w, "w", buffering=1))
        assert main(["params", "--d-model", "512", "--n-blocks", "8", "--expansion-rate", "64"]) == 141
