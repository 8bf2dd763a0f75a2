"""Joint embedding space: stable ids, add_modality, state_dict round trip, freezing, fusion."""

import io

import pytest
import torch
from _encoder_helpers import DIM, assert_row_matches, tiny_inputs, tiny_space_config

from jin_encoders import (
    CustomEncoderConfig,
    CustomModalityEncoder,
    EncoderInputError,
    JointEmbeddingSpace,
    ModalityEncoder,
    TextLMHead,
)


def _proprio(seed: int = 5) -> CustomModalityEncoder:
    torch.manual_seed(seed)
    return CustomModalityEncoder(CustomEncoderConfig(dim=DIM, input_dim=12))


def _slice(value, row, inputs_key):
    """One sample of a tiny_inputs entry, cropped to its own size (what it would be alone)."""
    if inputs_key == "text":
        return [value[row]]
    if inputs_key == "custom":
        return value[row : row + 1]
    if inputs_key == "image":
        h, w = value["sizes"][row].tolist()
        return value["x"][row : row + 1, :, :h, :w].clone()
    if inputs_key == "audio":
        return value["x"][row : row + 1, : int(value["lengths"][row])].clone()
    count = int((~value["padding_mask"][row]).sum())
    return value["x"][row : row + 1, :count].clone()


def test_ids_are_assigned_at_registration_not_by_input_order(space):
    assert space.modality_ids == {"text": 0, "image": 1, "audio": 2, "points": 3, "custom": 4}
    inputs = tiny_inputs()
    reordered = dict(reversed(list(inputs.items())))
    a, b = space.encode(inputs), space.encode(reordered)
    assert list(b) == list(a) == space.modalities
    for name in a:
        assert torch.equal(a[name].tokens, b[name].tokens)
    fused = space.fuse(b)
    assert fused.modality_ids[0].unique().tolist() == [0, 1, 2, 3, 4]


def test_modality_embedding_is_added_to_every_valid_token(space):
    inputs = tiny_inputs()
    for name, out in space.encode(inputs).items():
        raw = (
            space.encoders[name](**inputs[name])
            if isinstance(inputs[name], dict)
            else space.encoders[name](inputs[name])
        )
        valid = out.valid_mask
        diff = (out.tokens - raw.tokens)[valid]
        expected = space.modality_embed[space.modality_ids[name]].expand_as(diff)
        torch.testing.assert_close(diff, expected)
        assert bool((out.tokens[~valid] == 0).all())


def test_every_modality_is_padding_invariant_through_the_space(space):
    inputs = tiny_inputs()
    batched = space.encode(inputs)
    for name, value in inputs.items():
        for row in range(3):
            alone = space.encode({name: _slice(value, row, name)})[name]
            assert_row_matches(batched[name], row, alone)


def test_fusion_is_padding_invariant_and_splits_back(space):
    inputs = tiny_inputs()
    fused = space(inputs)
    total = sum(out.tokens.shape[1] for out in space.encode(inputs).values())
    assert fused.tokens.shape == (3, total, DIM) and fused.padding_mask.shape == (3, total)
    assert set(fused.split(fused.tokens)) == set(space.modalities)
    alone = space({name: _slice(value, 1, name) for name, value in inputs.items()})
    per_mod, per_mod_alone = fused.outputs(), alone.outputs()
    for name in space.modalities:
        count = per_mod_alone[name].tokens.shape[1]
        torch.testing.assert_close(
            per_mod[name].tokens[1, :count], per_mod_alone[name].tokens[0], atol=2e-5, rtol=1e-4
        )
        assert bool(per_mod[name].valid_mask[1, :count].all())
        assert not bool(per_mod[name].valid_mask[1, count:].any())
    assert bool((fused.tokens[fused.padding_mask] == 0).all())


def test_fusion_may_have_zero_layers():
    torch.manual_seed(0)
    space = JointEmbeddingSpace(tiny_space_config(fusion_layers=0)).eval()
    encoded = space.encode(tiny_inputs())
    fused = space.fuse(encoded)
    assert torch.equal(fused.tokens, torch.cat([o.tokens for o in encoded.values()], dim=1))


def test_add_modality_keeps_existing_rows_and_outputs_bitwise(space):
    inputs = tiny_inputs()
    before = space.encode(inputs)
    before_fused = space(inputs).tokens
    before_table = space.modality_table.detach().clone()
    before_embeds = space.embed(inputs)
    new_id = space.add_modality("proprioception", _proprio())
    assert new_id == 5 and space.modality_table.shape == (6, DIM)
    assert torch.equal(space.modality_table[:5], before_table)
    after = space.encode(inputs)
    for name in before:
        assert torch.equal(before[name].tokens, after[name].tokens)
    assert torch.equal(before_fused, space(inputs).tokens)
    for name, emb in space.embed(inputs).items():
        assert torch.equal(before_embeds[name], emb)
    out = space.encode({**inputs, "proprioception": torch.randn(3, 12)})
    assert out["proprioception"].tokens.shape == (3, 1, DIM)
    assert space.heads["proprioception"].proj.out_features == 12


def test_state_dict_round_trip_with_an_added_modality(space):
    space.add_modality("proprioception", _proprio())
    inputs = {**tiny_inputs(), "proprioception": torch.randn(3, 12)}
    expected = space(inputs).tokens
    buffer = io.BytesIO()
    torch.save(space.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert JointEmbeddingSpace.registry_from_state_dict(state) == space.modalities
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-compatible

    torch.manual_seed(123)  # different init, so equality below proves the load
    fresh = JointEmbeddingSpace(tiny_space_config()).eval()
    fresh.add_modality("proprioception", _proprio(seed=99))
    assert not torch.equal(fresh(inputs).tokens, expected)
    fresh.load_state_dict(state)
    assert fresh.modality_ids == space.modality_ids
    assert torch.equal(fresh(inputs).tokens, expected)


def test_loading_a_state_dict_with_another_registry_fails_naming_both(space):
    state = space.state_dict()
    torch.manual_seed(0)
    other = JointEmbeddingSpace(tiny_space_config())
    other.add_modality("proprioception", _proprio())
    with pytest.raises(
        ValueError,
        match=r"registry mismatch: expected \['text', .*'proprioception'\].*"
        r"received \['text', 'image', 'audio', 'points', 'custom'\]",
    ):
        other.load_state_dict(state)


def test_gradients_reach_every_parameter(space):
    space.train()
    space.add_modality("proprioception", _proprio())
    inputs = {**tiny_inputs(), "proprioception": torch.randn(3, 12)}
    fused = space(inputs)
    loss = fused.tokens.square().mean()
    for name, tokens in fused.split(fused.tokens).items():
        mask = fused.split(fused.padding_mask)[name]
        loss = (
            loss
            + space.project(name, tokens, mask).sum()
            + space.heads[name](tokens).square().mean()
        )
    loss.backward()
    missing = [
        n for n, p in space.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)
    ]
    assert missing == []


def test_freeze_all_but_trains_only_the_new_modality(space):
    space.add_modality("proprioception", _proprio())
    space.freeze_all_but("proprioception")
    trainable = {id(p) for p in space.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in space.modality_parameters("proprioception")}
    assert space.modality_embed[5].requires_grad and not space.modality_embed[0].requires_grad
    space.freeze_all_but(["proprioception"], train_fusion=True)
    assert all(p.requires_grad for p in space.fusion.parameters())
    space.unfreeze_all()
    assert all(p.requires_grad for p in space.parameters())


def test_project_is_masked_mean_pooled_and_unit_norm(space):
    tokens = torch.randn(2, 4, DIM)
    mask = torch.tensor([[False, False, True, True], [False] * 4])
    junk = tokens.clone()
    junk[0, 2:] = 50.0
    a, b = space.project("image", tokens, mask), space.project("image", junk, mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    expected = torch.nn.functional.normalize(
        space.projections["image"](tokens[0, :2].mean(0)), dim=-1
    )
    torch.testing.assert_close(a[0], expected)
    assert a.shape == (2, 16)
    junk[0, 2:] = float("nan")  # padding may hold anything, NaN included
    torch.testing.assert_close(space.project("image", junk, mask), a)
    for bad in (mask.to(torch.uint8), mask[0]):  # ~uint8 is 255/254; (T,) would broadcast
        with pytest.raises(EncoderInputError, match=r"image: project: padding_mask: expected bool"):
            space.project("image", tokens, bad)


def test_text_head_is_tied_to_the_token_embedding_without_duplicate_keys(space):
    head = space.heads["text"]
    assert isinstance(head, TextLMHead) and head.tied
    assert not any(k.startswith("heads.text.weight") for k in space.state_dict())
    logits = head(torch.randn(1, 3, DIM))
    assert logits.shape == (1, 3, space.encoders["text"].vocab_size)
    torch.manual_seed(0)
    untied = JointEmbeddingSpace(tiny_space_config(tie_text_head=False))
    assert not untied.heads["text"].tied and "heads.text.weight" in untied.state_dict()
    targets = {"image": 64, "audio": 160, "points": 12, "custom": 7}
    assert {n: space.heads[n].proj.out_features for n in targets} == targets


def test_encode_batch_reads_the_collate_layout(space):
    inputs = tiny_inputs()
    texts = inputs["text"]
    raw = [t.encode() for t in texts]
    width = max(map(len, raw))
    text_bytes = torch.zeros(3, width, dtype=torch.uint8)
    for row, r in enumerate(raw):
        text_bytes[row, : len(r)] = torch.tensor(list(r), dtype=torch.uint8)
    batch = {
        "text": texts,
        "text_bytes": text_bytes,
        "text_padding_mask": torch.arange(width)[None]
        >= torch.tensor([len(r) for r in raw])[:, None],
        "image": inputs["image"]["x"],
        "image_sizes": inputs["image"]["sizes"],
        "audio": inputs["audio"]["x"],
        "audio_lengths": inputs["audio"]["lengths"],
        "audio_sample_rate": 16000,
        "points": inputs["points"]["x"],
        "points_padding_mask": inputs["points"]["padding_mask"],
        "custom": inputs["custom"],
        "custom_present": torch.tensor([True, False, True]),
        "id": ["a", "b", "c"],
        "label": torch.tensor([1, -1, 2]),
    }
    from_batch, direct = space.encode_batch(batch), space.encode(inputs)
    for name in direct:
        torch.testing.assert_close(from_batch[name].tokens[[0, 2]], direct[name].tokens[[0, 2]])
    assert from_batch["custom"].padding_mask.tolist() == [[False], [True], [False]]


def test_encode_batch_takes_a_batch_where_no_row_has_a_modality(space):
    # jin-data's collate gives such a modality empty columns: no pixels, samples or points.
    b, absent = 2, torch.zeros(2, dtype=torch.bool)
    batch = {
        "text_bytes": torch.zeros(b, 0, dtype=torch.uint8),
        "text_padding_mask": torch.ones(b, 0, dtype=torch.bool),
        "image": torch.zeros(b, 1, 0, 0, dtype=torch.uint8),
        "image_sizes": torch.zeros(b, 2, dtype=torch.long),
        "audio": torch.zeros(b, 0),
        "audio_lengths": torch.zeros(b, dtype=torch.long),
        "points": torch.zeros(b, 0, 4),
        "points_padding_mask": torch.ones(b, 0, dtype=torch.bool),
        "custom": torch.zeros(b, 7),
        **{f"{name}_present": absent for name in ("text", "image", "audio", "points", "custom")},
    }
    encoded = space.encode_batch(batch)
    assert sorted(encoded) == ["audio", "custom", "image", "points", "text"]
    for out in encoded.values():
        assert out.tokens.shape[0] == b and out.tokens.shape[1] >= 1
        assert bool(out.padding_mask.all()) and not bool(out.tokens.any())
    space.fuse(encoded)  # the all-padding sequence still fuses
    # An empty input with a row present is still an error.
    with pytest.raises(EncoderInputError, match="audio: input: expected at least one row"):
        space.encode({"audio": {"x": torch.zeros(2, 0), "present": torch.tensor([True, False])}})


def test_encode_batch_reads_int16_audio_as_pcm(space):
    # jin-data's audio_dtype="int16": full scale 32768, for the model to convert.
    gen = torch.Generator().manual_seed(4)
    pcm = ((torch.rand(2, 3000, generator=gen) - 0.5) * 30000).round().to(torch.int16)
    lengths = torch.tensor([3000, 2000])
    from_pcm = space.encode_batch({"audio": pcm, "audio_lengths": lengths})["audio"]
    from_float = space.encode_batch({"audio": pcm.float() / 32768, "audio_lengths": lengths})
    torch.testing.assert_close(from_pcm.tokens, from_float["audio"].tokens, rtol=0, atol=0)


def test_bad_input_names_the_modality(space):
    with pytest.raises(
        EncoderInputError,
        match=r"unknown modality 'smell': expected one of the registered modalities \['text'",
    ):
        space.encode({"smell": torch.zeros(1, 3)})
    with pytest.raises(
        EncoderInputError,
        match=r"image: images: expected \(B,1,H,W\) tensor, received \(1, 3, 8, 8\)",
    ):
        space.encode({"image": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(ValueError, match="add_modality: modality 'text' is already registered"):
        space.add_modality("text", _proprio())
    for bad in ("", "a.b", "a\0"):  # '.' splits state_dict keys; the registry pads with NUL
        with pytest.raises(ValueError, match=r"expected a non-empty name without '\.' or NUL"):
            space.add_modality(bad, _proprio())
    with pytest.raises(
        ValueError,
        match=r"add_modality\('wide'\): expected an encoder of width 32, received width 8",
    ):
        space.add_modality("wide", CustomModalityEncoder(CustomEncoderConfig(dim=8, input_dim=3)))


def test_config_inherits_dim_and_checks_widths():
    config = tiny_space_config()
    assert config.image.dim == DIM and config.points.dim == DIM
    with pytest.raises(ValueError, match=r"image.dim: expected 32 \(the space's dim\), got 16"):
        tiny_space_config(image={"dim": 16})
    with pytest.raises(ValueError, match="fusion_heads: expected a divisor of dim=32, got 5"):
        tiny_space_config(fusion_heads=5)
    with pytest.raises(ValueError, match="did you mean 'fusion_layers'"):
        tiny_space_config(fusion_layer=2)


def test_the_space_runs_in_bfloat16(space):
    space.to(torch.bfloat16)
    fused = space(tiny_inputs())
    assert fused.tokens.dtype == torch.bfloat16 and bool(torch.isfinite(fused.tokens).all())


def test_add_modality_to_a_bfloat16_space_builds_bfloat16_parameters(space):
    space.to(torch.bfloat16)
    space.add_modality("proprio", _proprio())
    assert {p.dtype for p in space.modality_parameters("proprio")} == {torch.bfloat16}
    inputs = {**tiny_inputs(), "proprio": torch.randn(3, 12)}
    fused = space(inputs)  # mixed float32/bfloat16 sequences failed in the fusion layer
    assert fused.tokens.dtype == torch.bfloat16 and bool(torch.isfinite(fused.tokens).all())
    assert space.embed({"proprio": inputs["proprio"]})["proprio"].dtype == torch.bfloat16


def test_add_modality_to_an_empty_bfloat16_space_takes_the_fusion_dtype():
    # With no modality row yet the new parameters were float32 and the fusion layer refused them.
    torch.manual_seed(0)
    none = dict.fromkeys(["text", "image", "audio", "points", "custom"])
    space = JointEmbeddingSpace(tiny_space_config(**none))  # fusion layers, no modality
    space.to(torch.bfloat16)
    space.add_modality("proprio", _proprio())
    assert {p.dtype for p in space.modality_parameters("proprio")} == {torch.bfloat16}
    fused = space({"proprio": torch.randn(3, 12)})
    assert fused.tokens.dtype == torch.bfloat16 and bool(torch.isfinite(fused.tokens).all())


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(space):
    inputs = tiny_inputs()
    expected = space(inputs)
    space.to("cuda")
    got = space(_to(inputs, "cuda"))
    torch.testing.assert_close(got.tokens.cpu(), expected.tokens, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.padding_mask.cpu(), expected.padding_mask)


class _Stop(Exception):
    pass


class _Recorder(ModalityEncoder):
    """Records where its inputs arrive, then stops (the meta device holds no values to encode)."""

    dim = DIM

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(DIM))
        self.seen: dict[str, object] = {}

    def forward(self, x, padding_mask=None, present=None, rate=None):
        self.seen = {"x": x.device, "padding_mask": padding_mask.device, "rate": rate}
        raise _Stop


def test_encode_moves_input_tensors_to_the_encoders_device(space):
    # A data loader's batch is on the host; the model may be on an accelerator. The meta device
    # stands in for one here: a CPU tensor reaching a meta module would fail as a GPU one does.
    recorder = _Recorder()
    space.add_modality("recorded", recorder)
    space.to("meta")
    batch = {
        "recorded": torch.ones(2, 3, DIM),
        "recorded_padding_mask": torch.zeros(2, 3, dtype=torch.bool),
        "recorded_present": torch.ones(2, dtype=torch.bool),
    }
    with pytest.raises(_Stop):
        space.encode_batch(batch)
    assert recorder.seen == {
        "x": torch.device("meta"),
        "padding_mask": torch.device("meta"),
        "rate": None,
    }
    with pytest.raises(_Stop):  # keyword arguments that are not tensors pass through
        space.encode(
            {
                "recorded": {
                    "x": torch.ones(2, 3, DIM),
                    "padding_mask": batch["recorded_padding_mask"],
                    "rate": 16000,
                }
            }
        )
    assert recorder.seen["x"] == torch.device("meta") and recorder.seen["rate"] == 16000
    assert batch["recorded"].device == torch.device("cpu")  # the caller's batch is not changed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_space_takes_host_inputs(space):
    inputs = tiny_inputs()
    expected = space(inputs)
    got = space.to("cuda")(inputs)
    torch.testing.assert_close(got.tokens.cpu(), expected.tokens, atol=1e-4, rtol=1e-4)
