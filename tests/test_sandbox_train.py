import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safediff.errors import SafediffError
from safediff.sandbox import FLUX_WEIGHTS_DIR, WEIGHTS_DIR, verify_weights, write_sums
from safediff.sandbox.train import CHECKPOINT, DENOISER_STEPS, RECORD, Settings, train


def tiny(out, **kw) -> Settings:
    base = dict(out=str(out), seed=0, vae_steps=2, denoiser_steps=2, batch_size=4, vae_batch_size=4, threads=1,
                tiny=True)
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("sb")
    train(tiny(out))
    return out


def test_output_is_a_loadable_stable_diffusion_folder(trained):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(trained))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == \
        ("scaled_linear", False, False, 1)
    assert pipe.safety_checker is None
    te = pipe.text_encoder.config
    assert (te.eos_token_id, te.bos_token_id, te.pad_token_id) == \
        (pipe.tokenizer.eos_token_id, pipe.tokenizer.bos_token_id, pipe.tokenizer.pad_token_id)
    assert len(pipe.tokenizer) > 512 and (trained / "tokenizer" / "vocab.json").is_file()
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained latents
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16  # 64x64 pixels, 16x16x4 latents
    image = pipe("a red circle and a blue square", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert not list(trained.rglob("*.bin")) and not list(trained.rglob("*.pt"))


def test_record_holds_command_seed_steps_and_sampler_defaults(trained):
    rec = json.loads((trained / RECORD).read_text())
    assert rec["seed"] == 0 and rec["steps_done"] == {"vae": 2, "unet": 2} and rec["complete"]
    assert rec["command"].startswith("safediff sandbox train --out ") and "--seed 0" in rec["command"]
    assert rec["defaults"] == {"steps": 25, "guidance": 5.0, "height": 64, "width": 64, "scheduler": "ddim"}
    assert rec["seconds_per_step"]["vae"] > 0 and rec["seconds_per_step"]["unet"] > 0
    assert "--vae-batch-size 4" in rec["command"] and set(rec["parameters"]) == {"vae", "unet", "text_encoder"}
    assert "--denoiser-steps 2" in rec["command"] and rec["architecture"] == "unet"
    assert set(rec["versions"]) >= {"torch", "diffusers", "transformers"}
    assert "unet_eps_mse" in rec["final_losses"] and "vae_mse" in rec["final_losses"]


def test_resume_continues_exactly_where_an_uninterrupted_run_would_be(tmp_path):
    train(tiny(tmp_path / "a", denoiser_steps=2))
    state = train(tiny(tmp_path / "a", denoiser_steps=4))  # same folder: resumes from the checkpoint
    assert state["unet_step"] == 4
    train(tiny(tmp_path / "b", denoiser_steps=4))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same process, threads and kernels: bit for bit


def test_v_zero_snr_objective_trains_diffusers_v_prediction_on_a_zero_terminal_snr_schedule(tmp_path):
    """--objective v-zero-snr (Lin et al. 2024): the exported scheduler declares it, its last training step holds no
    signal, the trainer's forward process and target are diffusers' own (add_noise, get_velocity), and the sampler
    draws the model from t = T."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from safediff.models import load_pipeline
    from safediff.sampling import generate, make_scheduler

    out = tmp_path / "v"
    train(tiny(out, objective="v-zero-snr"))
    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    cfg = pipe.scheduler.config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == \
        ("v_prediction", True, "trailing")
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0.0
    rec = json.loads((out / RECORD).read_text())
    assert "--objective v-zero-snr" in rec["command"] and "unet_v_mse" in rec["final_losses"]
    model = load_pipeline(str(out))
    reference = DDPMScheduler.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([0, 500, 999])
    a = model.adapter
    torch.testing.assert_close(a.noised(x0, noise, t), reference.add_noise(x0, noise, t))
    torch.testing.assert_close(a.training_target(x0, noise, t), reference.get_velocity(x0, noise, t))
    torch.testing.assert_close(a.noised(x0, noise, t)[2], noise[2])  # t = T: pure noise
    sch = make_scheduler(model)
    model.adapter.set_timesteps(sch, 3, 64, 64)
    assert sch.timesteps.tolist() == [999, 666, 332]  # "trailing": the first step is the pure-noise one
    images = generate(model, ["a red circle"], [0], steps=3, progress=False)
    assert torch.isfinite(images.pixels).all() and images.settings["steps"] == 3


def test_a_checkpoint_from_before_objective_resumes_as_epsilon(tmp_path):
    from safetensors.torch import load_file, safe_open, save_file

    train(tiny(tmp_path, denoiser_steps=2))
    ckpt = tmp_path / CHECKPOINT
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    state = json.loads(meta["state"])
    del state["identity"]["objective"]  # as written before --objective existed
    save_file(load_file(str(ckpt)), str(ckpt), metadata={**meta, "state": json.dumps(state)})
    assert train(tiny(tmp_path, denoiser_steps=3))["unet_step"] == 3
    with pytest.raises(SafediffError, match="different settings"):
        train(tiny(tmp_path, denoiser_steps=4, objective="v-zero-snr"))


def test_unet_on_a_given_vae_skips_stage_one_and_trains_what_the_full_run_would(trained, tmp_path):
    """--vae-from with --arch unet: no VAE training, the given VAE and scaling factor unchanged, and the UNet and text
    encoder bit for bit those of the run that trained that VAE itself (same seed, same stage-2 data)."""
    from safetensors.torch import load_file

    from safediff.sandbox import sha256

    out = tmp_path / "g"
    state = train(tiny(out, vae_from=str(trained)))
    assert state["vae_step"] == 0 and state["unet_step"] == 2
    rec, full = (json.loads((d / RECORD).read_text()) for d in (out, trained))
    assert rec["steps_done"] == {"vae": 0, "unet": 2} and rec["steps_planned"]["vae"] == 0 and rec["complete"]
    assert f"--vae-from {trained}" in rec["command"] and "--vae-steps" not in rec["command"]
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    assert rec["vae"] == {"from": str(trained), "sha256": sha256(trained / vae_file)}
    assert rec["scaling_factor"] == full["scaling_factor"]
    for part in (vae_file, "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(str(out / part)), load_file(str(trained / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    with pytest.raises(SafediffError, match="config differs"):  # a full-size run cannot take the tiny VAE
        train(tiny(tmp_path / "h", vae_from=str(trained), tiny=False))


def test_time_cap_stops_early_and_keeps_a_checkpoint(tmp_path):
    state = train(tiny(tmp_path, vae_steps=10_000, minutes=0.05))
    assert 0 < state["vae_step"] < 10_000 and (tmp_path / CHECKPOINT).is_file()
    assert not (tmp_path / RECORD).exists()  # no model to export before the UNet stage


@pytest.mark.parametrize("change,match", [(dict(minutes=0), "minutes"), (dict(minutes=-1), "minutes"),
                                          (dict(device="tpu"), "device"), (dict(denoiser_steps=0), "denoiser-steps"),
                                          (dict(arch="dit"), "arch.*unet, flux"),
                                          (dict(arch="flux", vae_from="/nonexistent"), "vae-from.*no trained"),
                                          (dict(vae_from="/nonexistent"), "vae-from.*no trained"),
                                          (dict(objective="x0"), "objective.*epsilon, v-zero-snr"),
                                          (dict(arch="flux", objective="v-zero-snr"), "objective is for --arch unet")])
def test_bad_settings_are_one_clear_error(tmp_path, change, match):
    with pytest.raises(SafediffError, match=match):
        train(tiny(tmp_path / "o", **change))


def test_non_empty_or_unwritable_out_is_rejected(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(SafediffError, match="not empty"):
        train(tiny(tmp_path / "full"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SafediffError, match="is a file"):
        train(tiny(tmp_path / "file"))
    with pytest.raises(SafediffError, match="not writable"):
        train(tiny(tmp_path / "file" / "sub"))


def test_cli_defaults_are_the_settings_defaults():
    import inspect

    from safediff.sandbox.cli import train as cli_train

    defaults = {name: p.default.default for name, p in inspect.signature(cli_train).parameters.items()
                if name != "out"}
    # the CLI's defaults give the Settings' defaults (--denoiser-steps None: the architecture's length)
    assert Settings(out="x", **defaults) == Settings(out="x"), defaults
    assert Settings(out="x", **{**defaults, "arch": "flux"}) == Settings(out="x", arch="flux")


def test_cli_reports_bad_input_as_safediff_error(tmp_path):
    from typer.testing import CliRunner

    from safediff.sandbox.cli import app

    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "o"), "--minutes", "0"])
    assert isinstance(result.exception, SafediffError)


def test_shipped_vae_round_trip_keeps_everything_the_detectors_read():
    """Encoding and decoding a render with the shipped VAE leaves every object's colour, shape, style and side and the
    mark as the detectors read them (measured: 399 of 400 scenes; all 300 striped, outlined and solid objects): what
    the model fails to draw (e.g. stripes) is lost by the UNet, not by the latent space."""
    import numpy as np
    from diffusers import AutoencoderKL

    from safediff.detectors.sandbox import SandboxMark, objects
    from safediff.sandbox import world

    torch.set_num_threads(1)
    rng = np.random.default_rng(11)
    scenes = [world.random_scene(rng) for _ in range(120)]
    x = torch.tensor(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    vae = AutoencoderKL.from_pretrained(str(WEIGHTS_DIR / "vae"), use_safetensors=True).eval()
    with torch.no_grad():
        y = ((vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)

    def read(images):
        return [[(o["colour"], o["shape"], o["style"], o["side"]) for o in f] for f in objects(images)]

    same = [a == b for a, b in zip(read(x), read(y))]
    assert sum(same) >= 0.98 * len(scenes)
    mark = SandboxMark()
    assert mark.verdict(y).tolist() == mark.verdict(x).tolist() == [s.mark for s in scenes]


def test_verify_weights_catches_missing_and_corrupt_files(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SafediffError, match="safediff sandbox train --out DIR"):
        verify_weights(tmp_path)  # no SHA256SUMS yet
    write_sums(tmp_path)
    assert verify_weights(tmp_path) == tmp_path
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"weightz")
    with pytest.raises(SafediffError, match="corrupt.*safediff sandbox train --out DIR"):
        verify_weights(tmp_path)
    (tmp_path / "unet" / "w.safetensors").unlink()
    with pytest.raises(SafediffError, match="missing"):
        verify_weights(tmp_path)


@pytest.mark.skipif(not (WEIGHTS_DIR / "SHA256SUMS").is_file(), reason="shipped sandbox weights absent")
def test_shipped_weights_verify_fit_the_size_budget_and_record_their_command():
    verify_weights()
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    # the 7.0 M-parameter UNet is 26.8 MiB in fp32, exported in shards of at most 16 MB: every file under 20 MB;
    # the whole model 34 MiB: room for the FLUX-format sandbox next to it within 60 MB
    assert all(p.stat().st_size < 20 * 10**6 for p in files)
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20
    rec = json.loads((WEIGHTS_DIR / RECORD).read_text())
    assert rec["command"].startswith("safediff sandbox train") and rec["steps_done"]["unet"] == DENOISER_STEPS["unet"]


@pytest.fixture(scope="module")
def trained_flux(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("sbf")
    train(tiny(out, arch="flux", vae_from=str(trained)))
    return out


def test_flux_output_is_a_loadable_flux_folder_on_the_given_vae(trained, trained_flux):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from safetensors.torch import load_file

    pipe = FluxPipeline.from_pretrained(str(trained_flux))
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.use_dynamic_shifting
    assert not pipe.transformer.config.guidance_embeds  # undistilled: true CFG
    assert pipe.transformer.config.in_channels == 16 and pipe.vae_scale_factor == 4  # 2x2-packed 16x16x4 latents
    assert type(pipe.tokenizer_2).__name__.startswith("T5Tokenizer") and pipe.tokenizer_2.model_max_length == 48
    assert pipe.tokenizer_2.tokenize("a crimson circle") == ["\u2581a", "\u2581crimson", "\u2581circle"]
    vae_a = load_file(str(trained / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_b = load_file(str(trained_flux / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)  # the UNet sandbox's VAE, untouched
    assert pipe.vae.config.shift_factor != 0 and pipe.vae.config.scaling_factor > 0
    image = pipe("a red circle and a blue square", num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                 output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_flux_record_and_resume(trained, trained_flux, tmp_path):
    rec = json.loads((trained_flux / RECORD).read_text())
    assert rec["architecture"] == "flux" and rec["steps_done"] == {"vae": 0, "transformer": 2} and rec["complete"]
    assert "--arch flux" in rec["command"] and f"--vae-from {trained}" in rec["command"]
    assert rec["defaults"]["scheduler"] == "euler" and "undistilled" in rec["guidance"]
    assert set(rec["parameters"]) == {"vae", "transformer", "text_encoder", "text_encoder_2"}
    assert len(rec["vae"]["sha256"]) == 64 and "transformer_v_mse" in rec["final_losses"]
    kw = dict(arch="flux", vae_from=str(trained))
    train(tiny(tmp_path / "a", denoiser_steps=1, **kw))
    assert train(tiny(tmp_path / "a", denoiser_steps=3, **kw))["transformer_step"] == 3
    train(tiny(tmp_path / "b", denoiser_steps=3, **kw))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SafediffError, match="different settings"):  # resuming needs the same architecture
        train(tiny(tmp_path / "a", denoiser_steps=4))


def test_sandbox_flux_spec_loads_the_shipped_folder_or_says_how_to_train_it(trained_flux, tmp_path, monkeypatch):
    import shutil

    from safediff import sandbox
    from safediff.models import load_pipeline

    shipped = tmp_path / "weights_flux"
    monkeypatch.setitem(sandbox.MODELS, "sandbox-flux", shipped)
    monkeypatch.setattr(sandbox, "FLUX_WEIGHTS_DIR", shipped)
    with pytest.raises(SafediffError, match="sandbox train --arch flux --out DIR"):
        load_pipeline("sandbox-flux")
    shutil.copytree(trained_flux, shipped, ignore=shutil.ignore_patterns(".*"))
    write_sums(shipped)
    model = load_pipeline("sandbox-flux")
    assert model.adapter.arch == "flux" and model.defaults["scheduler"] == "euler" and model.defaults["height"] == 64
    assert model.protocol()["spec"] == "sandbox-flux"


def test_flux_step_is_the_rectified_flow_loss_of_diffusers_flux_pipeline(trained, tmp_path):
    """An independent reference for the FLUX training step: diffusers' own FluxPipeline encodes the captions, packs
    the latents and builds the position ids; x_sigma = (1 - sigma) x0 + sigma eps, target eps - x0."""
    from diffusers import FluxPipeline

    from safediff.sandbox import world
    from safediff.sandbox import train as trainer
    from safediff.sandbox.architectures import to_pixels
    from safediff.sandbox.tokenizer import load_tokenizer, write_tokenizer_files

    s = tiny(tmp_path / "o", arch="flux", vae_from=str(trained))
    m = trainer._Models(s, load_tokenizer(write_tokenizer_files(tmp_path / "tok")))
    loss = trainer._denoiser_step(m, s, 3)

    rng, gen = trainer._step_rng(s.seed, 2, 3)
    images, captions, _ = world.sample_batch(rng, s.batch_size)
    pipe = m.nets.pipeline()
    assert isinstance(pipe, FluxPipeline)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(captions, captions, max_sequence_length=48)
        post = pipe.vae.encode(to_pixels(images, "cpu")).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.randint(0, 1000, (len(x0),), generator=gen).float() / 1000
        xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        b, c, h, w = xt.shape
        pred = pipe.transformer(hidden_states=FluxPipeline._pack_latents(xt, b, c, h, w), timestep=sigma,
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", xt.dtype),
                                return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                            pipe.vae_scale_factor)
        reference = torch.nn.functional.mse_loss(pred, noise - x0)
    # measured relative gap 1e-7 to 2e-7 (default and avx2 kernels, 1 and 2 threads): float32 rounding of the two
    # call paths; 1e-5 leaves 50x room and still fails on any formula difference (those move the loss by > 1 %)
    assert abs(loss - float(reference)) <= 1e-5 * float(reference)


@pytest.mark.skipif(not (FLUX_WEIGHTS_DIR / "SHA256SUMS").is_file(), reason="shipped sandbox-flux weights absent")
@pytest.mark.parametrize("spec", ["sandbox", "sandbox-flux"])
def test_shipped_sampler_default_is_a_scheduler_name_the_model_accepts(spec):
    from safediff.models import load_pipeline
    from safediff.sampling import make_scheduler

    model = load_pipeline(spec)
    assert type(make_scheduler(model, model.defaults["scheduler"])) is type(model.pipe.scheduler)


def test_shipped_flux_weights_verify_and_both_sandboxes_fit_in_60_mb():
    verify_weights(FLUX_WEIGHTS_DIR)
    files = [p for d in (WEIGHTS_DIR, FLUX_WEIGHTS_DIR) for p in d.rglob("*") if p.is_file()]
    assert all(p.stat().st_size < 20 * 10**6 for p in files)
    assert sum(p.stat().st_size for p in files) <= 60 * 10**6
    rec = json.loads((FLUX_WEIGHTS_DIR / RECORD).read_text())
    assert rec["architecture"] == "flux" and "--arch flux" in rec["command"] and rec["complete"]
    # the default length of `--arch flux` is the shipped model's: the plain command reproduces it
    assert rec["steps_done"]["transformer"] == DENOISER_STEPS["flux"] == Settings(out="x", arch="flux").denoiser_steps
