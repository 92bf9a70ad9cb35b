"""The model: every fusion and sharing mode, the paper's parameter counts, shared weights
that really are shared, factorised layers, and that the tiny model learns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import DictConfig

from conftest import REPO
from pemt.config import ConfigError, compose_config
from pemt.data.decode import decode_clips, video_to_float
from pemt.data.loader import clip_spec
from pemt.data.synthetic import SyntheticSpec, make_sample
from pemt.model.cnn import BatchNorm
from pemt.model.factorized import Factorization, FactorizedDense
from pemt.model.factory import build_pretraining_model, check_model, cnn_warmup_steps
from pemt.model.params import count_parameters
from pemt.model.pretraining import AVPretrainingModel
from pemt.train.optimizer import ENCODERS, build_optimizer, check_optimizer

SHARING = ["[]", "[layer]", "[cross]", "[layer,cross]", "[factorized]", "[layer,cross,factorized]"]


def _cfg(*overrides: str) -> DictConfig:
    return compose_config("pretrain", overrides=list(overrides))


def _batch(cfg: DictConfig, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    d = cfg.data
    frames = 1 + int(d.frames_per_clip / d.fps * 1000 / d.mel_hop_ms)
    video = torch.rand(batch, d.clips, 3, d.frames_per_clip, d.crop, d.crop)
    audio = torch.randn(batch, d.clips, 1, d.mel_bins, frames)
    return video, audio


@pytest.mark.parametrize("fusion", ["mid", "early", "late"])
@pytest.mark.parametrize("sharing", SHARING)
def test_every_fusion_and_sharing_mode_trains(fusion: str, sharing: str) -> None:
    cfg = _cfg(f"model.fusion={fusion}", f"model.sharing={sharing}")
    model = build_pretraining_model(cfg)
    out = model(*_batch(cfg))
    assert {"loss", "loss_mep_visual", "loss_mep_audio", "loss_pair"} <= set(out)
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, f"parameters with no gradient: {unused}"


@pytest.mark.parametrize("fusion", ["mid", "early", "late"])
def test_the_agreement_pair_head_trains_the_transformers_through_both_bos(fusion: str) -> None:
    """loss.pair_head=agreement with the pair objective alone: every transformer the pair's two
    BOS come from gets gradient (in mid fusion the multimodal one learns from this head only)."""
    cfg = _cfg(f"model.fusion={fusion}", "loss.pair_head=agreement", "loss.mep_weight=0")
    model = build_pretraining_model(cfg)
    video, audio = _batch(cfg)
    out = model(video, audio)
    out["loss"].backward()
    unused = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()}
    assert not {n for n in unused if not n.startswith(("mep_heads.", "mask_tokens"))}, unused
    with pytest.raises(ConfigError, match="loss.pair_head='dot'"):
        check_model(_cfg("loss.pair_head=dot"))


@pytest.mark.parametrize("level", ["video", "clip"])
def test_the_audio_visual_infonce_trains_both_cnns_at_either_level(level: str) -> None:
    """loss.contrastive_level: pooled outputs per video, or each second's clip embeddings; either
    way both CNNs get gradient from it alone, and a level that does not exist is refused."""
    alone = ["loss.mep_weight=0", "loss.pair_weight=0", "loss.contrastive_weight=1"]
    cfg = _cfg(*alone, f"loss.contrastive_level={level}")
    model = build_pretraining_model(cfg)
    video, audio = _batch(cfg)
    out = model(video, audio)
    out["loss"].backward()
    for cnn in ("visual_cnn", "audio_cnn"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(f"backbone.{cnn}.")]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), cnn
    with pytest.raises(ConfigError, match="loss.contrastive_level='second'"):
        check_model(_cfg("loss.contrastive_level=second"))


def test_mep_targets_choose_whether_mep_trains_the_cnns_it_predicts() -> None:
    """MEP alone: with fixed targets the CNNs learn only through the context the transformers read,
    so their gradient differs from trained targets'; an unknown choice is refused by name."""
    grads = {}
    for targets in ("fixed", "trained"):
        cfg = _cfg("loss.pair_weight=0", "loss.contrastive_weight=0", f"loss.mep_targets={targets}")
        torch.manual_seed(0)
        model = build_pretraining_model(cfg)
        torch.manual_seed(1)
        video, audio = _batch(cfg)
        model(video, audio, step_seed=0)["loss"].backward()
        grads[targets] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "visual_cnn" in n])
    assert grads["fixed"].abs().sum() > 0, "the context path still trains the CNNs"
    assert not torch.allclose(grads["fixed"], grads["trained"])
    with pytest.raises(ConfigError, match="loss.mep_targets='frozen'"):
        check_model(_cfg("loss.mep_targets=frozen"))


def test_cnn_warmup_trains_only_the_cnns_until_its_step() -> None:
    """During loss.cnn_warmup_steps only the InfoNCE counts: the CNNs learn, the transformers and
    heads do not (the default clip-level InfoNCE does not even run them, and MEP and the pair are
    not reported); from that step on every objective trains them. Without a step (benchmarks,
    tests) every objective counts. The warm-up takes at most half the run, none without the InfoNCE."""
    cfg = _cfg("loss.cnn_warmup_steps=3", "train.max_steps=100")
    assert cfg.loss.contrastive_level == "clip"
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    torch.manual_seed(1)
    video, audio = _batch(cfg)
    encoders = {f"backbone.{name}." for name in ENCODERS}

    def gradients(step: int | None) -> tuple[float, float, dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model(video, audio, step_seed=0, step=step)
        out["loss"].backward()
        norms = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.grad is not None}
        cnn = sum(v for n, v in norms.items() if n.startswith(tuple(encoders)))
        return cnn, sum(v for n, v in norms.items() if not n.startswith(tuple(encoders))), out

    cnn, rest, out = gradients(2)
    assert cnn > 0 and rest == 0, (cnn, rest)
    assert out["loss"].item() == pytest.approx(out["loss_contrastive"].item())
    assert not {"loss_mep_visual", "loss_pair", "pair_accuracy"} & out.keys()
    assert {"contrastive_vs_chance", "spread_visual", "spread_audio"} <= out.keys()
    for step in (3, None):
        cnn, rest, out = gradients(step)
        assert cnn > 0 and rest > 0, (step, cnn, rest)
        assert out["loss"].item() > out["loss_contrastive"].item()
    with pytest.raises(ConfigError, match="loss.cnn_warmup_steps=-1"):
        check_model(_cfg("loss.cnn_warmup_steps=-1"))
    assert cnn_warmup_steps(_cfg("loss.cnn_warmup_steps=300", "train.max_steps=100")) == 50
    assert cnn_warmup_steps(_cfg("loss.cnn_warmup_steps=300", "train.max_steps=100", "loss.contrastive_weight=0")) == 0


def test_a_warmup_without_the_transformers_computes_what_running_them_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipping the transformers in the CNN warm-up changes no number: the loss and every CNN
    gradient are bitwise those of the full forward pass, whose other objectives count zero times.
    A video-level InfoNCE reads the transformers' outputs, so that warm-up still runs them."""
    cfg = _cfg("loss.cnn_warmup_steps=3", "train.max_steps=100")
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    video, audio = _batch(cfg)

    def step_zero() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model(video, audio, step_seed=0, step=0)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    skipped, skipped_grads = step_zero()
    monkeypatch.setattr(type(model), "warmup_reads_clips_only", property(lambda _: False))
    full, full_grads = step_zero()
    assert torch.equal(skipped, full)
    assert skipped_grads.keys() < full_grads.keys()
    for name, grad in skipped_grads.items():
        assert torch.equal(grad, full_grads[name]), name
    assert all(not grad.any() for name, grad in full_grads.items() if name not in skipped_grads)
    monkeypatch.undo()
    pooled = build_pretraining_model(
        _cfg("loss.cnn_warmup_steps=3", "train.max_steps=100", "loss.contrastive_level=video")
    )
    assert not pooled.warmup_reads_clips_only
    assert "loss_pair" in pooled(video, audio, step_seed=0, step=0)


def test_at_initialisation_the_transformers_input_is_mostly_content() -> None:
    """Positions, cells and token types start small beside the clip embeddings they are added to
    (BERT's N(0, 0.02)): the multimodal input after its LayerNorm still points where the content
    does, so videos start out different to the transformers."""
    from pemt.model.transformer import SequenceEmbedding

    torch.manual_seed(0)
    embedding = SequenceEmbedding(256, max_clips=8, modalities=2, dropout=0.0, max_tokens_per_clip=4)
    visual, audio = torch.randn(4, 32, 256), torch.randn(4, 32, 256)
    embedded = embedding(visual, audio, tokens_per_clip=4)
    content = torch.cat([visual, audio], dim=1)
    kept = torch.nn.functional.cosine_similarity(
        torch.cat([embedded[:, 1:33], embedded[:, 34:]], dim=1), content, dim=-1
    )
    assert kept.min() > 0.95, kept.min()


def test_bf16_through_deepspeed_keeps_fp32_statistics_and_master_weights(single_rank_deepspeed: None) -> None:
    """precision=bf16 as the trainer builds it: DeepSpeed's bf16 engine computes in bf16, keeps
    fp32 master weights the optimizer updates, and leaves BatchNorm statistics in fp32."""
    import deepspeed

    from pemt.train.engine_config import deepspeed_config
    from pemt.train.optimizer import build_optimizer

    cfg = _cfg("precision=bf16", "gpus_per_node=1", "train.global_batch_size=4", "data.streams=4")
    model = build_pretraining_model(cfg)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
    )
    assert engine.bfloat16_enabled()
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    masters = engine.optimizer.single_partition_of_fp32_groups  # ZeRO's flat fp32 copies
    assert masters and all(p.dtype == torch.float32 for p in masters)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    statistics = next(m for m in engine.module.modules() if isinstance(m, BatchNorm))
    running_before = statistics.running_mean.clone()

    video, audio = _batch(cfg)
    out = engine(video.bfloat16(), audio.bfloat16())
    assert torch.isfinite(out["loss"])
    engine.backward(out["loss"])
    engine.step()

    assert {b.dtype for b in engine.module.buffers()} <= {torch.float32, torch.int64}
    assert statistics.running_mean.dtype == torch.float32
    assert not torch.equal(statistics.running_mean, running_before), "statistics were not updated"
    changed = sum(not torch.equal(a, p.detach().float()) for a, p in zip(before, engine.module.parameters()))
    assert changed > len(before) // 2, "the optimizer step did not reach the bf16 weights"


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_through_deepspeed_a_warmup_without_the_transformers_steps_as_running_them_did(
    single_rank_deepspeed: None, monkeypatch: pytest.MonkeyPatch, zero: str
) -> None:
    """The parameters the CNN warm-up does not reach get no gradient, not a zero one. ZeRO must
    step them as it steps zero gradients (AdamW's weight decay and moments included): after warm-up
    steps and a full one, every weight is bitwise that of a run that computed the transformers."""
    import deepspeed

    from pemt.train.engine_config import deepspeed_config

    cfg = _cfg(
        f"deepspeed={zero}",
        "gpus_per_node=1",
        "train.global_batch_size=4",
        "data.streams=4",
        "train.warmup_steps=0",
        "train.weight_decay=0.1",  # a decay the warm-up visibly applies to the weights it does not reach
    )
    cfg.loss.cnn_warmup_steps, cfg.train.max_steps = 2, 10
    video, audio = _batch(cfg)

    def trained(skip: bool) -> list[torch.Tensor]:
        if not skip:
            monkeypatch.setattr(AVPretrainingModel, "warmup_reads_clips_only", property(lambda _: False))
        torch.manual_seed(0)
        model = build_pretraining_model(cfg)
        assert model.cnn_warmup_steps == 2
        optimizer, scheduler = build_optimizer(model, cfg.train)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg)
        )

        def weights(module: torch.nn.Module) -> list[torch.Tensor]:  # whole, also where ZeRO-3 partitions them
            with deepspeed.zero.GatheredParameters(list(module.parameters())):
                return [p.detach().clone() for p in module.parameters()]

        pair_head = weights(engine.module.pair_head)
        for step in range(3):  # two warm-up steps, then every objective
            out = engine(video, audio, step_seed=step, step=step)
            assert ("loss_pair" in out) == (step == 2 or not skip)
            engine.backward(out["loss"])
            engine.step()
            if step == 1:  # not run, yet decayed
                assert not torch.equal(pair_head[0], weights(engine.module.pair_head)[0])
        monkeypatch.undo()
        final = weights(engine.module)
        engine.destroy()
        return final

    skipped, full = trained(skip=True), trained(skip=False)
    assert skipped[0].numel() > 1
    assert all(torch.equal(a, b) for a, b in zip(skipped, full, strict=True))


def test_backbone_output_shapes() -> None:
    cfg = _cfg()
    backbone = build_pretraining_model(cfg).backbone
    video, audio = _batch(cfg, batch=3)
    visual, sound = backbone.embed_clips(video, audio)
    hidden, clips = cfg.model.hidden_size, cfg.data.clips
    assert visual.shape == sound.shape == (3, clips, hidden)
    assert backbone.contextualise("visual", visual).shape == (3, 1 + clips, hidden)
    assert backbone.fuse(visual, sound).shape == (3, 2 + 2 * clips, hidden)


@pytest.mark.parametrize(
    ("sharing", "expected_millions"),
    [("[]", 127.6), ("[layer]", 21.3), ("[layer,cross,factorized]", 3.90)],
)
def test_paper_transformer_counts_within_two_percent(sharing: str, expected_millions: float) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "count_params.py"),
            "model=avbert_base",
            f"model.sharing={sharing}",
            "data.clips=30",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    rows = json.loads(result.stdout)
    assert abs(rows["transformers"] / 1e6 - expected_millions) / expected_millions < 0.02, rows
    assert rows["total"] > rows["transformers"]


def test_shared_parameters_are_one_tensor_with_gradient_from_every_user() -> None:
    cfg = _cfg("model.sharing=[layer,cross,factorized]")
    model = build_pretraining_model(cfg)
    backbone = model.backbone
    stack = backbone.transformer("visual")
    assert stack is backbone.transformer("audio") is backbone.transformer("multimodal")
    assert len(stack.layers) == 1 and stack.depth == cfg.model.num_layers
    shared = stack.layers[0].query.last.weight  # the output-side factor, shared by modalities
    video, audio = _batch(cfg)
    visual, sound = backbone.embed_clips(video, audio)
    users = {
        "visual": lambda: backbone.contextualise("visual", visual),
        "audio": lambda: backbone.contextualise("audio", sound),
        "multimodal": lambda: backbone.fuse(visual, sound),
    }
    for name, run in users.items():
        model.zero_grad()
        run().square().mean().backward(retain_graph=True)
        assert shared.grad is not None and shared.grad.abs().sum() > 0, name
        private = stack.layers[0].query.first
        touched = [i for i, p in enumerate(private) if p.weight.grad is not None and p.weight.grad.abs().sum() > 0]
        assert touched == [backbone.names.index(name)], f"{name} must use only its own private factor"


def test_sharing_divides_transformer_parameters() -> None:
    def transformers(sharing: str) -> int:
        return count_parameters(build_pretraining_model(_cfg(f"model.sharing={sharing}")))["transformers"]

    embeddings = sum(
        v for k, v in count_parameters(build_pretraining_model(_cfg())).items() if k.startswith("embeddings.")
    )
    none, layer, both = (
        transformers("[]") - embeddings,
        transformers("[layer]") - embeddings,
        transformers("[layer,cross]") - embeddings,
    )
    assert layer * _cfg().model.num_layers == none
    assert both * 3 == layer


def test_full_rank_free_factorised_layer_fits_any_dense_matrix() -> None:
    torch.manual_seed(0)
    target = torch.randn(12, 12)
    layer = FactorizedDense(12, 12, modalities=2, spec=Factorization(rank=12, inner="free", normalize=False))
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.02)
    x = torch.randn(256, 12)
    for _ in range(1500):
        loss = (layer(x, modality=1) - x @ target.T).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-4 * target.square().mean().item() * 12


@pytest.mark.parametrize("rank", [16, 64, 128])
def test_a_factorised_layer_keeps_a_dense_layers_output_scale(rank: int) -> None:
    """Not normalised (the default) or normalised to unit RMS, a factorised layer's output is about
    as large as the dense layer it replaces, whatever the rank. (The public code's L2 normalisation
    made it ~sqrt(rank) times smaller: the residual stream barely moved, and pretraining learned far
    less.)"""
    from pemt.model.factorized import Dense

    torch.manual_seed(0)
    x = torch.randn(512, 256)
    dense_std = Dense(256, 256)(x).std().item()
    assert Factorization(rank=rank).normalize == "none"
    for mode in ("none", "rms"):
        factorised = FactorizedDense(256, 256, modalities=3, spec=Factorization(rank=rank, normalize=mode))
        ratio = factorised(x, modality=2).std().item() / dense_std
        assert 0.5 < ratio < 2.0, (mode, ratio)
    unit = FactorizedDense(256, 256, modalities=3, spec=Factorization(rank=rank, normalize="unit"))
    assert unit(x, modality=2).std().item() / dense_std < 0.5, "the unit mode: the public code's, kept as is"


def test_orthogonal_inner_matrix_stays_orthogonal_under_training() -> None:
    torch.manual_seed(0)
    layer = FactorizedDense(16, 16, modalities=3, spec=Factorization(rank=8, inner="orthogonal"))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05)
    before = layer.inner[1].weight.detach().clone()
    for _ in range(50):
        loss = layer(torch.randn(32, 16), modality=1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    inner = layer.inner[1].weight.detach()
    assert not torch.allclose(inner, before), "the inner matrix trains"
    assert torch.allclose(inner @ inner.T, torch.eye(8), atol=1e-5)


@pytest.fixture(scope="module")
def few_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Four real synthetic videos, decoded: distinct content a model can memorise."""
    spec = SyntheticSpec(videos=4, seconds=2.0)
    clips = [decode_clips(make_sample(spec, i)["mp4"], clip_spec(_cfg().data), None) for i in range(4)]
    return video_to_float(torch.stack([c["video"] for c in clips]), "cpu", torch.float32), torch.stack(
        [c["audio"] for c in clips]
    )


@pytest.mark.parametrize("hidden", [64, 256])
def test_transformer_lr_scale_slows_all_but_the_clip_encoders(hidden: int) -> None:
    """The CNNs and their projections train at train.lr, everything else (transformers,
    embeddings, heads) at train.lr x train.transformer_lr_scale at hidden size 256, in proportion
    to 256 / hidden at other widths, through the schedule; at 1.0 the optimizer keeps the two
    groups earlier checkpoints were saved with."""
    width = [f"model.hidden_size={hidden}", f"model.ffn_size={2 * hidden}"]
    model = build_pretraining_model(_cfg(*width))
    backbone = model.get_submodule("backbone")
    encoders = {id(p) for name in ENCODERS for p in getattr(backbone, name).parameters()}
    cfg = _cfg(*width, "train.lr=1e-3", "train.transformer_lr_scale=0.1", "train.warmup_steps=1")
    optimizer, schedule = build_optimizer(model, cfg.train)
    schedule.step()  # past the warm-up: the peak rates
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rate.keys() == {id(p) for p in model.parameters()}
    assert sorted({rate[i] for i in encoders}) == pytest.approx([1e-3])
    expected = {64: 4e-4, 256: 1e-4}[hidden]
    assert sorted({r for i, r in rate.items() if i not in encoders}) == pytest.approx([expected])
    assert len(build_optimizer(model, _cfg("train.transformer_lr_scale=1.0").train)[0].param_groups) == 2
    for bad in (0, -1, "fast", True):
        with pytest.raises(ConfigError, match=f"train.transformer_lr_scale={bad!r}"):
            check_optimizer(_cfg(f"train.transformer_lr_scale={str(bad).lower()}"))


@pytest.mark.parametrize("sharing", SHARING)
def test_tiny_model_overfits_a_few_pairs(sharing: str, few_pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.manual_seed(0)
    # Training's own recipe (warmup, cosine decay, gradient clipping): with plain AdamW at a
    # constant 1e-3, a factorised model's trajectory hung on the machine's rounding (on one
    # CPU the pair objective stalled at 0.75 accuracy); with the recipe, 3-6 seeds per sharing
    # mode each reached 0.22-0.48 of the first loss and every pair.
    recipe = ["train.lr=1e-3", "train.warmup_steps=10", "train.max_steps=200", "train.weight_decay=0.0"]
    recipe += ["train.transformer_lr_scale=1.0"]  # the rate these were measured at, for every part
    cfg = _cfg(f"model.sharing={sharing}", "loss.mask_ratio=0.25", "loss.sampling=uniform", *recipe)
    model = build_pretraining_model(cfg)
    optimizer, schedule = build_optimizer(model, cfg.train)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():  # the same masks and negatives before and after
            return {k: v.item() for k, v in model(*few_pairs, step_seed=10**6).items()}

    before = evaluate()
    for step in range(cfg.train.max_steps):  # keyed draws: the trajectory owes nothing to global RNG state
        loss = model(*few_pairs, step_seed=step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
    after = evaluate()
    print(f"{sharing}: loss {before['loss']:.3f} -> {after['loss']:.3f}")
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["pair_accuracy"] == 1.0, after


def _thirty_second_step(checkpointing: bool) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Bytes saved for backward during the forward pass, the gradients, and BatchNorm's
    statistics after one step of a 30 s (480-frame) sequence."""
    flag = str(checkpointing).lower()
    cfg = _cfg(
        "data.clips=30",
        "data.frames_per_clip=16",
        "data.fps=16",
        "data.crop=16",
        f"model.activation_checkpointing.cnns={flag}",
        f"model.activation_checkpointing.transformers={flag}",
    )
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    torch.manual_seed(1)
    video, audio = _batch(cfg, batch=2)
    assert video.shape[1] * video.shape[3] == 480, "30 s at 16 fps"
    saved = 0

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = model(video, audio, step_seed=7)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    assert len(grads) == len(list(model.parameters()))
    return saved, grads, stats


def test_thirty_second_clips_checkpointed_give_the_same_gradients_for_far_less_memory() -> None:
    plain_bytes, plain_grads, plain_stats = _thirty_second_step(False)
    checkpointed_bytes, grads, stats = _thirty_second_step(True)
    assert checkpointed_bytes < plain_bytes / 4, (checkpointed_bytes, plain_bytes)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The recomputation in the backward pass must not update BatchNorm's statistics a second time
    for name, value in plain_stats.items():
        torch.testing.assert_close(stats[name], value, msg=name)


@pytest.mark.parametrize("tokens_per_clip", [1, 4])
def test_cnn_out_norm_centres_pooled_features_that_otherwise_share_one_offset(tokens_per_clip: int) -> None:
    """A ReLU network's pooled features are nearly alike across clips (a shared positive offset);
    with `out_norm` each channel is centred and scaled over the batch in training (every cell of
    every clip when a clip gives several tokens), and evaluation uses the running statistics.
    Off by default, so a checkpoint saved without it has the same keys."""
    from pemt.model.cnn import ResNet

    clips, grid = torch.rand(32, 3, 4, 16, 16), int(tokens_per_clip**0.5)

    def across_clips(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = features.detach().reshape(-1, features.shape[-1])
        return flat.mean(0), flat.var(0, unbiased=False)

    def spread(features: torch.Tensor) -> float:
        mean, var = across_clips(features)
        return float(var.sum().sqrt() / (var + mean.square()).sum().sqrt())

    torch.manual_seed(0)
    plain = ResNet(3, 3, width=8, layers=[1, 1])
    torch.manual_seed(0)
    normalised = ResNet(3, 3, width=8, layers=[1, 1], out_norm=True)
    assert spread(plain(clips, grid)) < 0.3
    trained = normalised(clips, grid)
    assert trained.shape == plain(clips, grid).shape
    mean, var = across_clips(trained)
    assert mean.abs().max() < 1e-4 and (var - 1).abs().max() < 0.02 and spread(trained) > 0.99  # eps: not 1 exactly
    normalised.eval()
    norm = normalised.out_norm
    assert norm is not None and norm.running_mean is not None and norm.running_var is not None
    normalised.out_norm = None
    features = normalised(clips, grid)
    normalised.out_norm = norm
    expected = (features - norm.running_mean) / (norm.running_var + norm.eps).sqrt()
    assert torch.allclose(normalised(clips, grid), expected, atol=1e-5)

    neither = ["model.visual_cnn.out_norm=false", "model.audio_cnn.out_norm=false"]
    keys = set(build_pretraining_model(_cfg(*neither)).state_dict())
    assert not any("out_norm" in k for k in keys)
    assert {k for k in build_pretraining_model(_cfg()).state_dict() if k not in keys} == {  # on by default
        f"backbone.{cnn}.out_norm.{stat}"
        for cnn in ("visual_cnn", "audio_cnn")
        for stat in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
