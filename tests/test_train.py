"""The embedded model's training recipe still runs end to end (a few steps) and writes a loadable
model with its card; the shipped model has the architecture the recipe builds."""

import json

import fastitm
from fastitm.train import build_model, main


def test_recipe_runs_and_writes_a_loadable_model_with_card(tmp_path):
    out = tmp_path / "m"
    args = ["--out", str(out), "--images", "64", "--vae-steps", "3", "--vae-batch", "8", "--unet-steps", "3",
            "--unet-batch", "8", "--save-every", "2", "--threads", "2"]
    assert main(args) == 0
    model = fastitm.load_model(out)
    assert model.resolution == 32 and model.latent_shape == (4, 8, 8)
    info = json.loads((out / "training.json").read_text())
    assert info["command"] == "python -m fastitm.train " + " ".join(args)
    assert [h["step"] for h in info["unet_history"]] == [0, 2]
    card = (out / "README.md").read_text()
    assert info["command"] in card and "| UNet step |" in card
    # The latent scale was fitted: the training latents have unit standard deviation once scaled.
    assert abs(model.vae.config.scaling_factor - info["vae_scaling_factor"]) < 1e-6


def test_shipped_model_has_the_recipes_architecture():
    shipped, built = fastitm.load_model(), build_model(0)
    for name in ("unet", "vae", "text_encoder"):
        a = {k: tuple(v.shape) for k, v in getattr(shipped, name).state_dict().items()}
        b = {k: tuple(v.shape) for k, v in getattr(built, name).state_dict().items()}
        assert a == b, name
    assert shipped.tokenizer.get_vocab() == built.tokenizer.get_vocab()
