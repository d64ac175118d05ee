import pytest
import torch

from tests.helpers.settings import merged
from tpdiff_lightning.models.dit import VideoDiT
from tpdiff_lightning.training.module import TPDiffModule, to_uint8_video


def _module(**overrides):
    torch.manual_seed(0)
    defaults = {"clip": {"num_frames": 16, "resolution": 16}, "optimization": {"ema_decay": 0.9}, "sampling": {"steps": 6}}
    return TPDiffModule(**merged(defaults, overrides))


def _batch(B=4, F=16, H=16):
    g = torch.Generator().manual_seed(0)
    return {"video": torch.rand(B, 3, F, H, H, generator=g) * 2 - 1,
            "caption": ["a red square moving right fast"] * B, "num_skipped": torch.tensor(0)}


@pytest.mark.parametrize("num_stages,expected", [(1, [16]), (3, [4, 8, 16]), (5, [1, 2, 4, 8, 16])])
def test_backbone_really_receives_the_stage_length(num_stages, expected):
    m = _module(pyramid={"num_stages": num_stages})
    seen = []
    handle = m.backbone.blocks[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    batch = _batch()
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    for i in range(num_stages):
        m.stage_loss(x0, text, mask, i)
    handle.remove()
    tokens_per_frame = (16 // m.backbone.patch_size) ** 2
    assert seen == [f * tokens_per_frame for f in expected]


def test_stage_passes_its_stride_to_the_backbone():
    m = _module()
    strides = []
    original = m.backbone.forward
    m.backbone.forward = lambda *a, **k: (strides.append(k["stride"]), original(*a, **k))[1]
    batch = _batch()
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    for i in range(3):
        m.stage_loss(x0, text, mask, i)
    assert strides == [4, 2, 1]


def test_stage_draw_depends_on_the_step_only():
    a, b = _module(), _module(objective={"stage_seed": 0})
    draws_a = [a.pyramid.sample_stage(a.stage_generator(s)) for s in range(200)]
    draws_b = [b.pyramid.sample_stage(b.stage_generator(s)) for s in range(200)]
    assert draws_a == draws_b and set(draws_a) == {0, 1, 2}


def test_training_step_logs_stage_loss_and_nan_stops_with_step_and_stage():
    m = _module()
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    loss = m.training_step(_batch(), 0)
    assert torch.isfinite(loss) and "train/loss" in logged
    assert any(k.startswith("train/loss_stage") for k in logged)
    with torch.no_grad():  # a diverged network
        m.backbone.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"loss is nan at global_step=0 in stage \d"):
        m.training_step(_batch(), 0)


def test_ema_tracks_the_weights_and_swaps_them_in_only_within_the_block():
    m = _module(optimization={"ema_decay": 0.5})
    before = [s.clone() for s in m.ema.shadows()]
    assert len(before) == len([p for p in m.denoiser_modules().parameters() if p.requires_grad])
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    m.ema.update(m.denoiser_modules())
    moved = [not torch.equal(a, b) for a, b in zip(before, m.ema.shadows())]
    assert all(moved[: len(list(m.backbone.parameters()))])
    assert int(m.ema.num_updates) == 1
    trained = [p.clone() for p in m.backbone.parameters()]
    with m.ema_weights():
        inside = [p.clone() for p in m.backbone.parameters()]
    after = list(m.backbone.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trained, after))  # restored
    n = len(trained)
    assert all(torch.equal(a, s) for a, s in zip(inside, m.ema.shadows()[:n]))  # averaged weights inside
    assert not any(torch.equal(a, b) for a, b in zip(inside, trained))


def test_ema_stays_float32_when_the_model_is_cast_to_bf16_and_still_moves():
    m = _module(optimization={"ema_decay": 0.999})
    with torch.no_grad():
        m.ema.shadows()[0].fill_(1.001)  # e.g. restored from a checkpoint: not representable in bf16
    m = m.to(torch.bfloat16)  # what Lightning's bf16-true precision does, after restoring a checkpoint
    assert next(m.backbone.parameters()).dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in m.ema.shadows())
    assert torch.all(m.ema.shadows()[0] == torch.tensor(1.001))  # the values did not pass through bf16
    m.ema.num_updates.fill_(10_000)  # past the warm-up: the full 0.999 decay
    with torch.no_grad():
        for p in m.denoiser_modules().parameters():
            p.add_(1.0)
    before = [s.clone() for s in m.ema.shadows()]
    m.ema.update(m.denoiser_modules())
    params = dict(m.denoiser_modules().named_parameters())
    for name, shadow, old in zip(m.ema.names, m.ema.shadows(), before):
        expected = old + 0.001 * (params[name].float() - old)  # 0.1% of a gap of about 1, kept in float32
        torch.testing.assert_close(shadow, expected, rtol=0, atol=1e-6)
    with m.ema_weights():
        assert next(m.backbone.parameters()).dtype == torch.bfloat16


def test_ema_shadows_only_trainable_parameters():
    m = _module(optimization={"ema_decay": 0.5})
    m.backbone.requires_grad_(False)
    next(m.backbone.parameters()).requires_grad_(True)
    m.ema.reset(m.denoiser_modules())
    trainable = sum(p.requires_grad for p in m.denoiser_modules().parameters())
    assert len(m.ema.shadows()) == trainable < len(list(m.denoiser_modules().parameters()))


def test_optimizer_covers_backbone_and_text_encoder_but_not_ema():
    m = _module()
    opt = m.configure_optimizers()["optimizer"]
    ids = {id(p) for group in opt.param_groups for p in group["params"]}
    assert {id(p) for p in m.backbone.parameters()} <= ids
    assert {id(p) for p in m.text_encoder.parameters()} <= ids
    assert not ({id(s) for s in m.ema.shadows()} & ids)


def test_generate_is_seeded_and_works_for_longer_clips():
    m = _module()
    with torch.no_grad():  # leave zero-init so outputs depend on the network
        for p in m.backbone.final_layer.parameters():
            p.normal_(0, 0.02)
    a = m.generate(["a blue circle moving up slow"], [3])
    b = m.generate(["a blue circle moving up slow"], [3])
    c = m.generate(["a blue circle moving up slow"], [4])
    assert a.shape == (1, 3, 16, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    long = m.generate(["a blue circle moving up slow"], [3], num_frames=32, guidance_scale=2.0)
    assert long.shape == (1, 3, 32, 16, 16)
    video = to_uint8_video(long)
    assert video.dtype == torch.uint8 and video.shape == (1, 32, 16, 16, 3)


def test_predict_step_samples_placeholders_but_returns_only_real_items():
    m = _module()
    with torch.no_grad():
        for p in m.backbone.final_layer.parameters():
            p.normal_(0, 0.02)
    batch = {"caption": ["a blue circle moving up slow", "a red square moving right fast"],
             "seed": torch.tensor([3, 4]), "index": torch.tensor([7, -1])}
    out = m.predict_step(batch, 0)
    assert out["index"] == [7] and out["seed"] == [3] and out["caption"] == ["a blue circle moving up slow"]
    alone = to_uint8_video(m.generate(["a blue circle moving up slow"], [3]))
    assert out["video"].shape == (1, 16, 16, 16, 3) and torch.equal(out["video"], alone)


def test_caption_dropout_rate():
    m = _module(objective={"caption_dropout": 0.3})
    torch.manual_seed(0)
    dropped = m.drop_captions(["x"] * 4000)
    assert abs(dropped.count("") / 4000 - 0.3) < 0.03


def test_custom_backbone_factory_gets_channels_and_text_width():
    calls = []

    def factory(in_channels, text_dim):
        calls.append((in_channels, text_dim))
        return VideoDiT(in_channels, text_dim, size="dit-tiny")

    _module(backbone=factory)
    assert calls == [(3, 128)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(clip={"num_frames": 18}), r"model\.init_args\.clip\.num_frames=18"),  # 18 / 4 in the stage-0 stride
    (dict(objective={"schedule": "edm"}), r"model\.init_args\.objective\.schedule='edm'"),
    (dict(objective={"caption_dropout": 1.5}), r"model\.init_args\.objective\.caption_dropout=1\.5"),
    (dict(pyramid={"partition": [1, 1]}), r"model\.init_args\.pyramid\.partition"),
])
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


@pytest.mark.parametrize("schedule,scale", [("flow", 1000.0), ("ddim", 999.0)])
def test_backbone_is_told_the_scaled_global_time(schedule, scale):
    m = _module(objective={"schedule": schedule})
    told = []
    original = m.backbone.forward
    m.backbone.forward = lambda x, t, *a, **k: (told.append(t.clone()), original(x, t, *a, **k))[1]
    batch = _batch()
    x0 = m.encode_video(batch["video"])
    text, mask = m.text_encoder(batch["caption"])
    g = torch.Generator().manual_seed(0)
    m.stage_loss(x0, text, mask, 1, g)
    stage = m.pyramid.stages[1]
    # Re-draw with the same generator state to recover u: noise first, then u.
    g2 = torch.Generator().manual_seed(0)
    torch.randn(m.pyramid.stage_shape(x0, 1), generator=g2)
    u = torch.rand(4, generator=g2)
    expected = (stage.t_end + u * (stage.t_start - stage.t_end)) * scale
    torch.testing.assert_close(told[0], expected)


def test_noise_seeds_differ_across_ranks_and_repeat_on_resume():
    m = _module()
    assert m.noise_seed(10, 0) != m.noise_seed(10, 1)
    assert m.noise_seed(10, 0) != m.noise_seed(11, 0)
    assert m.noise_seed(10, 1) == _module().noise_seed(10, 1)


def test_text_encoder_learning_rate_scale():
    m = _module(optimization={"text_lr_scale": 5.0, "lr": 1e-3})
    opt = m.configure_optimizers()["optimizer"]
    lrs = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # peak, before warmup
    assert all(lrs[id(p)] == pytest.approx(5e-3) for p in m.text_encoder.parameters())
    assert all(lrs[id(p)] == pytest.approx(1e-3) for p in m.backbone.parameters())


def test_non_square_frames_generate_at_their_size():
    m = _module(clip={"resolution": (8, 16)}, pyramid={"num_stages": 2}, sampling={"steps": 2})
    video = m.generate(["a red square"], [0])
    assert video.shape == (1, 3, 16, 8, 16)
    batch = {"video": torch.rand(2, 3, 16, 8, 16) * 2 - 1, "caption": ["a", "b"]}
    m.log = lambda *a, **k: None
    assert torch.isfinite(m.training_step(batch, 0))


def test_a_batch_with_the_wrong_frame_count_is_a_clear_error():
    m = _module()
    m.log = lambda *a, **k: None
    with pytest.raises(ValueError, match="the batch has 12 latent frames; the pyramid expects 16"):
        m.training_step(_batch(F=12), 0)


def test_checkpoints_from_the_full_copy_ema_still_load():
    m = _module(optimization={"ema_decay": 0.5})
    with torch.no_grad():
        for s in m.ema.shadows():
            s.add_(1.0)
    old = {k: v for k, v in m.state_dict().items() if not (k.startswith("ema.") and "__" in k)}
    old.update({"ema.shadow." + n: s.clone() for n, s in zip(m.ema.names, m.ema.shadows())})
    fresh = _module(optimization={"ema_decay": 0.5})
    checkpoint = {"state_dict": old}
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.ema.shadows(), m.ema.shadows()))


def test_global_alignment_without_stage_sync_is_refused():
    with pytest.raises(ValueError, match=r"objective\.alignment_scope=.global. needs model\.init_args\.objective\.stage_sync=true"):
        _module(objective={"alignment_scope": "global", "stage_sync": False})


def test_a_causal_codec_without_the_anchor_names_video_and_latent_frames():
    from tests.helpers.tiny_vae import TINY_WAN_VAE
    from tpdiff_lightning.models.vae import WanVAECodec

    codec = WanVAECodec(config=TINY_WAN_VAE)
    with pytest.raises(ValueError, match="num_frames=17 video frames are 5 latent frames.*anchor_first_frame"):
        _module(clip={"num_frames": 17}, pyramid={"anchor_first_frame": False}, codec=codec)
    assert _module(clip={"num_frames": 17}, pyramid={"anchor_first_frame": True}, codec=codec).pyramid.num_frames == 5


def _perturb(m):
    """Move the zero-initialised output layer, so outputs depend on the network (build without an EMA, whose
    shadows would keep the zeros)."""
    assert m.ema is None
    with torch.no_grad():
        for p in m.backbone.final_layer.parameters():
            p.normal_(0, 0.02)
    return m


def _one_prompt_at_a_time(m, captions, seeds, scale):
    """The sampling loop before batching: one caption per call, guidance as two forward passes."""
    from tpdiff_lightning.method.sampling import guided, sample

    clips = []
    H, W = m.latent_size()
    m.eval()
    with torch.no_grad(), m.ema_weights(True):
        for caption, seed in zip(captions, seeds):
            text, mask = m.text_encoder([caption])
            model = m.denoiser(m.backbone, text, mask)
            if scale != 1.0:
                empty, empty_mask = m.text_encoder([""])
                model = guided(model, m.denoiser(m.backbone, empty, empty_mask), scale)
            latents = sample(model, m.pyramid, 1, (m.codec.latent_channels, H, W), m.settings.sampling.steps,
                             torch.Generator().manual_seed(seed), m.settings.sampling.renoise, device=m.device,
                             dtype=torch.float32, timestep_shift=m.settings.sampling.timestep_shift)
            clips.append(m.codec.decode(latents))
    return torch.cat(clips).clamp(-1, 1)


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("batch_size", [2, 8])
def test_batched_generate_equals_one_prompt_at_a_time(scale, batch_size):
    m = _perturb(_module(sampling={"guidance_scale": scale, "batch_size": batch_size}, optimization={"ema_decay": None}))
    captions = ["a blue circle moving up slow", "a red square moving left fast", "a green circle"]
    seeds = [3, 9, 4]
    calls = []
    original = m.backbone.forward
    m.backbone.forward = lambda x, *a, **k: (calls.append(x.shape[0]), original(x, *a, **k))[1]
    batched = m.generate(captions, seeds)
    m.backbone.forward = original
    torch.testing.assert_close(batched, _one_prompt_at_a_time(m, captions, seeds, scale), rtol=0, atol=1e-5)
    rows = 2 if scale != 1.0 else 1  # guidance: conditional and unconditional halves in one forward pass
    chunks = [min(batch_size, 3 - k) for k in range(0, 3, batch_size)]
    assert calls == [rows * c for c in chunks for _ in range(m.settings.sampling.steps)]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_global_velocity_loss_is_the_stage_loss_weighted_by_the_span_squared(i):
    losses = {}
    for velocity in ("stage", "global"):
        m = _module(objective={"flow_velocity": velocity, "alignment": False})
        m.backbone.forward = lambda x, *a, **k: torch.zeros_like(x)  # the loss is then the target's mean square
        x0 = m.encode_video(_batch()["video"])
        text, mask = m.text_encoder(["a"] * 4)
        losses[velocity] = m.stage_loss(x0, text, mask, i, torch.Generator().manual_seed(0))
    stage = m.pyramid.stages[i]
    span = stage.t_start - stage.t_end
    torch.testing.assert_close(losses["global"] * span**2, losses["stage"], rtol=1e-5, atol=0)


def _save_checkpoint(m, path, drop=()):
    import lightning

    hparams = {k: v for k, v in m.hparams.items()}
    for key in drop:  # "objective.flow_velocity": a setting an older checkpoint did not store
        group, field = key.split(".")
        hparams[group] = {k: v for k, v in hparams[group].items() if k != field}
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__, "global_step": 0}, path)
    return path


def test_flow_velocity_is_stored_and_a_checkpoint_without_it_loads_as_stage(tmp_path):
    m = _perturb(_module(objective={"flow_velocity": "global"}, pyramid={"num_stages": 2}, sampling={"steps": 4}, optimization={"ema_decay": None}))
    loaded = TPDiffModule.load_from_checkpoint(_save_checkpoint(m, tmp_path / "new.ckpt"))
    assert loaded.settings.objective.flow_velocity == "global" and loaded.pyramid.flow_velocity == "global"
    old = TPDiffModule.load_from_checkpoint(_save_checkpoint(m, tmp_path / "old.ckpt", drop=("objective.flow_velocity",)))
    assert old.settings.objective.flow_velocity == "stage" and old.pyramid.flow_velocity == "stage"
    # The old checkpoint samples as it was trained: with the stage-time velocity.
    as_trained = _module(objective={"flow_velocity": "stage"}, pyramid={"num_stages": 2}, sampling={"steps": 4}, optimization={"ema_decay": None})
    as_trained.load_state_dict(m.state_dict())
    video = old.generate(["a red square"], [1])
    assert torch.equal(video, as_trained.generate(["a red square"], [1]))
    assert not torch.allclose(video, loaded.generate(["a red square"], [1]), atol=1e-4)


def test_beta_schedule_and_timestep_shift_reach_the_pyramid_and_the_sampler():
    linear = _module(objective={"schedule": "ddim", "beta_schedule": "linear"})
    assert linear.pyramid.schedule.beta_schedule == "linear"
    assert _module(objective={"schedule": "ddim"}).pyramid.schedule.beta_schedule == "scaled_linear"
    assert linear.pyramid.stages[0].t_end != pytest.approx(_module(objective={"schedule": "ddim"}).pyramid.stages[0].t_end, abs=1e-3)
    m = _module(sampling={"timestep_shift": 5.0, "steps": 6, "guidance_scale": 1.0})
    told = []
    original = m.backbone.forward
    m.backbone.forward = lambda x, t, *a, **k: (told.append(float(t[0]) / 1000), original(x, t, *a, **k))[1]
    m.generate(["a"], [0])
    from tpdiff_lightning.method.sampling import stage_time_grid

    expected = [float(t) for s in m.pyramid.stages for t in stage_time_grid(s, 2, 5.0)[:-1]]
    assert told == pytest.approx(expected, abs=1e-6)


def test_sample_step_weights_reach_the_sampler():
    m = _module(sampling={"steps": 10, "guidance_scale": 1.0, "step_weights": [3, 1, 1]})
    frames = []
    original = m.backbone.forward
    m.backbone.forward = lambda x, *a, **k: (frames.append(x.shape[2]), original(x, *a, **k))[1]
    m.generate(["a"], [0])
    sizes = [s.num_frames for s in m.pyramid.stages]
    assert [frames.count(f) for f in sizes] == [6, 2, 2]


@pytest.mark.parametrize("kwargs,match", [
    (dict(objective={"flow_velocity": "x"}), r"objective\.flow_velocity='x' is invalid; expected one of \['stage', 'global'\]"),
    (dict(objective={"schedule": "ddim", "flow_velocity": "global"}), r"flow_velocity='global' is set for schedule='ddim'"),
    (dict(objective={"schedule": "ddim", "beta_schedule": "cosine"}),
     r"objective\.beta_schedule='cosine' is unknown; expected one of \['scaled_linear', 'linear'\]"),
    (dict(objective={"beta_schedule": "linear"}), r"beta_schedule='linear' is set for schedule='flow'"),
    (dict(sampling={"timestep_shift": 0}), r"sampling\.timestep_shift=0 is invalid; expected a number > 0"),
    (dict(sampling={"timestep_shift": -1.5}), r"sampling\.timestep_shift=-1\.5 is invalid; expected a number > 0"),
    (dict(objective={"schedule": "ddim"}, sampling={"timestep_shift": 5.0}),
     r"sampling\.timestep_shift=5\.0 is set for model\.init_args\.objective\.schedule='ddim'; expected 1"),
    (dict(sampling={"batch_size": 0}), r"sampling\.batch_size=0 is invalid; expected an integer >= 1"),
    (dict(sampling={"step_weights": [1, 1]}), r"sampling\.step_weights=\[1, 1\] is invalid; expected 3 positive numbers"),
    (dict(sampling={"steps": 2}), r"sampling\.steps=2 is invalid; expected an integer of at least one step per stage"),
    # YAML's true is a Python bool, which is an int: not a number of steps, a shift or a weight
    (dict(sampling={"timestep_shift": True}), r"sampling\.timestep_shift=True is invalid; expected a number > 0"),
    (dict(sampling={"step_weights": [True, True, True]}), r"sampling\.step_weights=\[True, True, True\] is invalid"),
    (dict(sampling={"batch_size": True}), r"sampling\.batch_size=True is invalid; expected an integer >= 1"),
    (dict(pyramid={"num_stages": True}), r"pyramid\.num_stages=True is invalid; expected an integer >= 1"),
    (dict(pyramid={"reductions": [True, 2]}), r"pyramid\.reductions=\[True, 2\] is invalid"),
    (dict(pyramid={"partition": [1, True, 1]}), r"pyramid\.partition=\[1, True, 1\] is invalid"),
    (dict(optimization={"betas": [1.5, 0.999]}), r"optimization\.betas=\[1\.5, 0\.999\] is invalid; expected two numbers"),
    (dict(optimization={"weight_decay": -1}), r"optimization\.weight_decay=-1 is invalid; expected a number >= 0"),
    (dict(optimization={"lr": 0}), r"optimization\.lr=0 is invalid; expected a learning rate > 0"),
    (dict(optimization={"ema_decay": 1.0}), r"optimization\.ema_decay=1\.0 is invalid; expected a number in \[0, 1\)"),
    (dict(pyramid={"num_stage": 2}), r"model\.init_args\.pyramid\.num_stage is not a setting; expected one of"),
])
def test_bad_new_module_arguments_name_the_key_and_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _module(**kwargs)


@pytest.mark.parametrize("scope,batch_size,world_size,warns", [
    ("local", 1, 8, True), ("local", 1, 1, True), ("local", 2, 1, False), ("local", 4, 8, False),
    ("global", 1, 1, True), ("global", 1, 8, False), ("global", 4, 1, False),
])
def test_alignment_that_cannot_act_is_warned_at_fit_start(scope, batch_size, world_size, warns):
    import warnings
    from types import SimpleNamespace

    m = _module(objective={"alignment_scope": scope})
    m.trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch_size), world_size=world_size,
                                global_rank=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.on_fit_start()
    messages = [str(w.message) for w in caught if "alignment is on" in str(w.message)]
    assert len(messages) == (1 if warns else 0)
    if warns:
        assert f"alignment_scope={scope!r}" in messages[0] and "acts on 1 clip" in messages[0]
    off = _module(objective={"alignment": False, "alignment_scope": scope})
    assert off.alignment_warning(batch_size, world_size) is None


def test_alignment_warning_falls_back_to_the_first_batch_without_a_datamodule_batch_size():
    import warnings
    from types import SimpleNamespace

    m = _module()
    m.trainer = SimpleNamespace(datamodule=None, world_size=1, global_rank=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.on_fit_start()
        m.on_train_batch_start({"caption": ["a"]}, 0)
        m.on_train_batch_start({"caption": ["a"]}, 1)
    assert sum("alignment is on" in str(w.message) for w in caught) == 1
