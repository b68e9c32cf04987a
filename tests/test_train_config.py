import pytest

from finemoe.cli import main
from finemoe.errors import ConfigError
from finemoe.train.config import TrainConfig


def test_yaml_roundtrip_and_coercion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tokens: 1e6\nlr: 2e-4\nbetas: [0.9, 0.95]\nmodel:\n  d_model: 128\n  ffn: dense\n")
    cfg = TrainConfig.from_yaml(p, ["model.n_blocks=3", "batch_size=8", "grad_clip=null"])
    assert cfg.tokens == 1_000_000 and cfg.lr == 2e-4 and cfg.betas == (0.9, 0.95)
    assert (
        cfg.model.d_model == 128 and cfg.model.n_blocks == 3 and cfg.batch_size == 8 and cfg.grad_clip is None
    )
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.steps == 1_000_000 // (8 * 256) and cfg.window == max(1, cfg.steps // 10)


def test_defaults_follow_the_paper():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.final_lr_fraction, cfg.warmup_fraction, cfg.weight_decay) == (2e-4, 0.1, 0.01, 0.1)
    assert cfg.betas == (0.9, 0.999)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"tokenz": 5}, "unknown training key"),
        ({"model": {"d_modle": 5}}, "unknown model key"),
        ({"tokens": 10}, "less than one step"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"betas": [0.9, 1.5]}, "betas"),
        ({"device": "tpu"}, "device must be one of"),
        ({"smooth_window": 0}, "smooth_window"),
    ],
)
def test_bad_configs_name_the_problem(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    p = tmp_path / "c.yaml"
    p.write_text("tokens: 100\n")
    assert main(["train", str(p), "junk"]) == 2
    err = capsys.readouterr().err
    assert "key=value" in err and len(err.strip().splitlines()) == 1
    p.write_text("tokens: [1\n")
    assert main(["train", str(p)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
