"""A shortened `python -m genfast.demo` run (both models): it trains, writes its two PNGs and
prints the duration estimate and the timing line; its help text and missing-extra message."""
import pytest

from genfast import demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("model", ["dcgan", "vae"])
def test_short_demo_writes_pngs(tmp_path, capsys, model):
    rc = demo.main(["--model", model, "--steps", "6", "--batch", "8", "--width", "16",
                    "--timing-steps", "1", "--no-progress", "--out", str(tmp_path), "--device", "cpu"])
    assert rc == 0
    for name in (f"{model}_loss.png", f"{model}_samples.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    out = capsys.readouterr().out
    assert "time per training step" in out and "genfast" in out
    assert "estimated duration:" in out and "for 6 steps" in out


def test_digits_data_is_upscaled_and_in_range():
    import torch

    data = demo.load_digits_28(torch.device("cpu"))
    assert data.shape == (1797, 1, 28, 28)
    assert float(data.min()) >= 0.0 and float(data.max()) <= 1.0 and float(data.std()) > 0.1


def test_missing_demo_extra_names_the_install_command(monkeypatch, capsys):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sklearn", "tqdm") else real(name, *a))
    assert demo.main(["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'genfast[demo]'" in err and "scikit-learn" in err and "tqdm" in err
    assert "matplotlib" not in err


def test_help_text_is_whole():
    text = " ".join(demo.parser().format_help().split())
    # the description is the module's whole docstring, ending in the duration note
    assert "Needs the demo extra: pip install 'genfast[demo]'" in text
    assert "an estimate of the duration is printed after the first steps." in text
    assert "800 on cpu" in text

