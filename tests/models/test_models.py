"""Properties of the built-in backbones: the video DiT, its stage-consistent RoPE, the text encoder and the codec."""

import copy
import os

import pytest
import torch
from torch.testing import assert_close

from tpdiff_lightning.models.codec import IdentityCodec
from tpdiff_lightning.models.dit import DIT_SIZES, VideoDiT
from tpdiff_lightning.models.rope import RoPE3D, rotate
from tpdiff_lightning.models.text_encoder import T5TextEncoder, TextEncoder

TEXT_DIM = 16


def make_model(**kwargs) -> VideoDiT:
    torch.manual_seed(0)
    return VideoDiT(3, TEXT_DIM, **kwargs)


def perturb(model: VideoDiT, std: float = 0.05) -> VideoDiT:
    """Move every weight off its (partly zero) init so that all paths of the network are live."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def inputs(B=2, F=4, H=16, W=16, L=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, F, H, W, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype) * 1000
    text = torch.randn(B, L, TEXT_DIM, generator=g, dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    return x, t, text, mask


@pytest.mark.parametrize("F,stride", [(2, 8), (4, 4), (8, 2), (16, 1), (32, 1), (4, 1), (8, 3)])
def test_output_shape_equals_input_shape(F, stride):
    model = perturb(make_model())
    x, t, text, mask = inputs(F=F)
    out = model(x, t, text, mask, stride=stride)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("F,S", [(1, 1), (4, 4), (8, 2), (16, 1), (5, 3)])
def test_temporal_positions_are_full_rate_timeline(F, S):
    assert torch.equal(make_model().temporal_positions(F, S), torch.arange(F) * S)


def test_rope_at_stride_matches_full_rate_frame():
    """Frame j at stride 2 is rotated exactly like frame 2j of the full-rate clip (Eq. 14)."""
    rope = RoPE3D(head_dim=32)
    h, w = 3, 2
    cos_s, sin_s = rope(4, h, w, stride=2)
    cos_1, sin_1 = rope(8, h, w, stride=1)
    q = torch.randn(2, h * w, 32)
    for j in range(4):
        low = slice(j * h * w, (j + 1) * h * w)
        full = slice(2 * j * h * w, (2 * j + 1) * h * w)
        assert_close(rotate(q, cos_s[low], sin_s[low]), rotate(q, cos_1[full], sin_1[full]))
    # The stride is not a no-op: at stride 1 frame 1 is rotated differently from full-rate frame 2.
    cos_u, _ = rope(4, h, w, stride=1)
    assert not torch.allclose(cos_u[h * w : 2 * h * w], cos_1[2 * h * w : 3 * h * w])


def test_rope_preserves_norm_and_relative_positions():
    rope = RoPE3D(head_dim=24)
    cos, sin = rope(6, 2, 2, stride=1)
    q, k = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    rq = rotate(q.expand(24, 24).float(), cos, sin).double()
    rk = rotate(k.expand(24, 24).float(), cos, sin).double()
    assert_close(rq.norm(dim=-1), q.norm().expand(24), rtol=1e-5, atol=1e-5)
    # Same spatial cell, frames 0→2 and 3→5: the score depends only on the offset.
    cell = lambda f: f * 4  # noqa: E731
    assert_close(rq[cell(0)] @ rk[cell(2)], rq[cell(3)] @ rk[cell(5)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("F", [4, 16])
def test_model_attends_over_the_shorter_sequence(F):
    model = make_model()
    seen = []
    model.blocks[0].attn.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    x, t, text, mask = inputs(F=F, H=32, W=32)
    model(x, t, text, mask, stride=16 // F)
    h = w = 32 // model.patch_size
    assert seen == [F * h * w]


def test_longer_clip_than_trained_has_no_length_table():
    """32 frames run through a model used with 16, and positions extend the 16-frame ones."""
    model = perturb(make_model())
    x16, t, text, mask = inputs(F=16)
    x32, *_ = inputs(F=32)
    assert model(x16, t, text, mask).shape == x16.shape
    out = model(x32, t, text, mask)
    assert out.shape == x32.shape and torch.isfinite(out).all()
    assert not any(16 in b.shape or 32 in b.shape for b in model.buffers())
    cos16, _ = model.rope(16, 2, 2)
    cos32, _ = model.rope(32, 2, 2)
    assert_close(cos32[: cos16.shape[0]], cos16)


def test_zero_init_output_then_gradient_flows():
    model = make_model()
    x, t, text, mask = inputs()
    assert torch.equal(model(x, t, text, mask), torch.zeros_like(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = (model(x, t, text, mask) - x).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert model(x, t, text, mask).abs().max() > 0


def test_padded_text_tokens_do_not_change_output():
    model = perturb(make_model()).double()
    x, t, text, mask = inputs(L=6, dtype=torch.float64)
    mask[0, 3:] = False
    mask[1, 5:] = False
    out = model(x, t, text, mask)
    text_pad = text.clone()
    text_pad[~mask] = torch.randn_like(text_pad[~mask]) * 10
    assert_close(model(x, t, text_pad, mask), out)
    # A real token does change it, so the check above can fail.
    text_real = text.clone()
    text_real[0, 0] += 1.0
    assert not torch.allclose(model(x, t, text_real, mask), out)


def test_all_masked_caption_is_finite():
    model = perturb(make_model())
    x, t, text, mask = inputs()
    mask[0] = False
    out = model(x, t, text, mask)
    assert torch.isfinite(out).all()
    # An empty caption ignores whatever sits in its token slots.
    assert_close(model(x, t, torch.randn_like(text), mask)[0], out[0])


@pytest.mark.parametrize("caption_pooling", [True, False])
def test_caption_changes_output(caption_pooling):
    encoder = T5TextEncoder(d_model=TEXT_DIM, num_heads=2, d_ff=32)
    model = perturb(make_model(caption_pooling=caption_pooling))
    with torch.no_grad():
        text, mask = encoder(["a red ball bouncing", "waves on a beach at night"])
        x, t, *_ = inputs()
        x, t = x[:1].expand(2, -1, -1, -1, -1), t[:1].expand(2)
        out = model(x, t, text, mask)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_unknown_size_raises_naming_it():
    with pytest.raises(ValueError, match="dit-huge") as err:
        VideoDiT(3, TEXT_DIM, size="dit-huge")
    assert "dit-tiny" in str(err.value)


@pytest.mark.parametrize("shape", [(2, 3, 4, 15, 16), (2, 3, 4, 16, 20), (2, 3, 16, 16)])
def test_bad_input_shape_raises(shape):
    model = make_model()
    _, t, text, mask = inputs()
    with pytest.raises(ValueError, match=r"H=15|W=20|\(B, C, F, H, W\)"):
        model(torch.randn(shape), t, text, mask)


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_registry_sizes_are_valid(size):
    cfg = DIT_SIZES[size]
    assert cfg.hidden % cfg.heads == 0
    RoPE3D(cfg.hidden // cfg.heads)  # raises on an odd or too small head dim


def test_gradient_checkpointing_gives_same_gradients():
    model = perturb(make_model()).double().train()
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing = True
    x, t, text, mask = inputs(dtype=torch.float64)
    for m in (model, ckpt):
        m(x, t, text, mask, stride=2).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in ckpt.named_parameters():
        assert_close(p.grad, grads[n], msg=n)
    assert grads["blocks.0.attn.qkv.weight"].abs().sum() > 0


def saved_bytes(model, *args, **kwargs) -> tuple[torch.Tensor, int]:
    """The output and the bytes of distinct non-parameter tensors autograd saves for backward in the forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*args, **kwargs)
    return out, sum(seen.values())


def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_output():
    model = perturb(make_model()).train()
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing = True
    x, t, text, mask = inputs()
    out, plain = saved_bytes(model, x, t, text, mask, stride=2)
    out_ckpt, kept = saved_bytes(ckpt, x, t, text, mask, stride=2)
    assert_close(out_ckpt, out, rtol=0, atol=0)
    assert kept < 0.6 * plain  # only each block's inputs are kept; the blocks run again in the backward pass


def test_text_encoder_shapes_and_mask():
    encoder = T5TextEncoder(max_length=16)
    captions = ["a cat", "", "a dog running in a park"]
    emb, mask = encoder(captions)
    assert isinstance(encoder, TextEncoder)
    assert emb.shape == (3, 16, encoder.dim) and mask.dtype == torch.bool
    # Bytes plus the end-of-sequence token, cut at max_length; the empty caption keeps its EOS token.
    assert mask.sum(1).tolist() == [6, 1, 16]
    assert torch.isfinite(emb).all()
    emb_short, mask_short = encoder(["a cat", ""])
    assert emb_short.shape == (2, 6, encoder.dim) and mask_short.sum(1).tolist() == [6, 1]


def test_text_encoder_trainable_and_frozen():
    trainable = T5TextEncoder()
    emb, _ = trainable(["hello"])
    emb.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())
    frozen = T5TextEncoder(trainable=False)
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == 0
    emb, _ = frozen(["hello"])
    assert not emb.requires_grad


def test_identity_codec_round_trip():
    codec = IdentityCodec()
    video = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    assert torch.equal(codec.decode(codec.encode(video)), video)
    assert (codec.latent_channels, codec.temporal_compression, codec.spatial_compression) == (3, 1, 1)
    with pytest.raises(ValueError, match="got"):
        codec.encode(torch.rand(2, 4, 8, 8))


def test_compiled_forward_builds_one_graph_per_stage_shape_and_keeps_the_numbers(monkeypatch):
    # A counting backend: dynamo traces as torch.compile does, and each graph it builds is counted (the
    # inductor backend gives the same graphs; bench/fit_throughput.py and docs/benchmarks.md measure it).
    import tpdiff_lightning.models.dit as dit

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)))
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setitem(dit.COMPILE_OPTIONS, "backend", counting_backend)
    eager = perturb(make_model()).train()
    compiled = copy.deepcopy(eager)
    compiled.compile = True
    assert set(compiled.state_dict()) == set(eager.state_dict())
    stages = [(4, 4), (8, 2), (16, 1)]  # (frames, stride) of a 3-stage pyramid
    per_stage = []
    for step in range(3):
        for frames, stride in stages:
            x, t, text, mask = inputs(F=frames)
            before = len(graphs)
            loss = compiled(x, t, text, mask, stride=stride).pow(2).mean()
            loss.backward()
            assert_close(loss, eager(x, t, text, mask, stride=stride).pow(2).mean(), rtol=1e-6, atol=1e-7)
            if step == 0:
                per_stage.append(len(graphs) - before)
            else:
                assert len(graphs) == sum(per_stage), "a stage shape was compiled again"
    assert per_stage[0] >= 1 and per_stage == [per_stage[0]] * len(stages)  # one build per stage shape
    torch._dynamo.reset()


def test_bad_compile_value_names_the_key():
    with pytest.raises(ValueError, match=r"compile='yes' is invalid; expected true or false"):
        make_model(compile="yes")


def test_absolute_positions_sit_at_the_stage_consistent_positions_and_change_only_the_input():
    model = perturb(make_model(absolute_positions=True))
    full = model.position_embedding(8, 4, 4, 1, 1, "cpu").view(8, 4, 4, -1)  # (F, h, w, D)
    assert full.shape[-1] == DIT_SIZES[model.size].hidden
    assert_close(model.position_embedding(4, 4, 4, 2, 1, "cpu").view(4, 4, 4, -1), full[::2])  # frame j at 2j
    assert_close(model.position_embedding(8, 2, 2, 1, 2, "cpu").view(8, 2, 2, -1), full[:, ::2, ::2])  # row a at 2a
    assert torch.unique(full.flatten(0, 2), dim=0).shape[0] == 8 * 4 * 4  # every token its own position
    plain = make_model()
    plain.load_state_dict(model.state_dict())  # no new weights: the same checkpoints load either way
    x, t, text, mask = inputs(F=4)
    assert not torch.allclose(model(x, t, text, mask), plain(x, t, text, mask))
    with pytest.raises(ValueError, match="absolute_positions='yes' is invalid"):
        make_model(absolute_positions="yes")


def test_word_tokens_give_each_word_one_id_with_no_shared_pieces():
    from tpdiff_lightning.models.word_hash_tokenizer import WordHashTokenizer

    tokenizer = WordHashTokenizer(4096)
    ids, mask = tokenizer(["a red square moving down fast", "A green square, moving UP", ""], max_length=64)
    words = [tokenizer.words(c) for c in ["a red square moving down fast", "A green square, moving UP"]]
    assert words[1] == ["a", "green", "square", ",", "moving", "up"]  # lower-cased, punctuation its own word
    assert mask.sum(1).tolist() == [7, 7, 1]  # one token per word plus the end token; "" keeps its end token
    assert ids[0, 6] == ids[1, 6] == ids[2, 0] == tokenizer.eos_token_id and ids[2, 1] == tokenizer.pad_token_id
    assert ids[0, 0] == ids[1, 0] and ids[0, 2] == ids[1, 2]  # the same word, the same id, wherever it stands
    assert ((ids >= 0) & (ids < len(tokenizer))).all()
    # The shortcut the byte tokenizer allows: "red" and "down" share the byte "d", so a caption with "down" carries
    # part of "red". As words they share nothing.
    red, down = (set(tokenizer([w], 64)[0][0, :-1].tolist()) for w in ("red", "down"))
    assert not red & down
    byte_encoder = T5TextEncoder(tokens="bytes")
    red_bytes, down_bytes = (set(byte_encoder.tokenize([w])[0][0, :-1].tolist()) for w in ("red", "down"))
    assert red_bytes & down_bytes
    # The synthetic captions' 14 words get 14 distinct ids with the default buckets.
    vocabulary = "a red green blue yellow square circle moving left right up down slow fast".split()
    assert len({tokenizer.word_id(w) for w in vocabulary}) == len(vocabulary)
    cut, cut_mask = tokenizer(["a red square moving down fast"], max_length=3)
    assert cut.shape == (1, 3) and cut[0, -1] == tokenizer.eos_token_id and cut_mask.all()


def test_word_ids_are_the_same_in_every_process():
    # A checkpoint's embedding rows must mean the same words wherever it is loaded: the ids may not depend on
    # Python's per-process string hash.
    import subprocess
    import sys

    code = ("from tpdiff_lightning.models.word_hash_tokenizer import WordHashTokenizer;"
            "print(WordHashTokenizer(4096)(['a green circle moving left slow'], 64)[0].tolist())")
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1


def test_word_text_encoder_shapes_round_trip_and_bad_tokens():
    encoder = T5TextEncoder(d_model=32, num_heads=2, d_ff=64, num_layers=1, tokens="words", word_buckets=64)
    emb, mask = encoder(["a cat", "", "a dog running in a park"])
    assert emb.shape == (3, 7, 32) and mask.sum(1).tolist() == [3, 1, 7]
    assert encoder.model.shared.num_embeddings == 66  # pad, end and the 64 word buckets
    again = T5TextEncoder(d_model=32, num_heads=2, d_ff=64, num_layers=1, tokens="words", word_buckets=64)
    again.load_state_dict(encoder.state_dict())
    assert_close(again(["a cat"])[0], encoder(["a cat"])[0][:1, :3])
    with pytest.raises(ValueError, match=r"tokens='word': expected one of bytes, words"):
        T5TextEncoder(tokens="word")
    with pytest.raises(ValueError, match=r"word_buckets=0"):
        T5TextEncoder(tokens="words", word_buckets=0)


def test_a_checkpoint_on_other_tokens_is_refused_naming_the_setting(tmp_path):
    from tpdiff_lightning.training.module import TPDiffModule

    small = {"clip": {"num_frames": 4, "resolution": 16}, "optimization": {"ema_decay": None}}
    on_bytes = TPDiffModule(text_encoder=T5TextEncoder(d_model=32, num_heads=2, num_layers=1), **small)
    path = tmp_path / "bytes.ckpt"
    torch.save({"state_dict": on_bytes.state_dict(), "global_step": 5}, path)
    on_words = TPDiffModule(text_encoder=T5TextEncoder(d_model=32, num_heads=2, num_layers=1, tokens="words"), **small)
    with pytest.raises(ValueError, match=r"384 token ids and this model's 4098.*tokens=bytes"):
        on_words.load_weights(str(path))
    TPDiffModule(text_encoder=T5TextEncoder(d_model=32, num_heads=2, num_layers=1), **small).load_weights(str(path))
    with pytest.raises(ValueError, match=r"max_length=0"):
        T5TextEncoder(max_length=0)
