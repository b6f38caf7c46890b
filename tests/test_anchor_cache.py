"""Anchor cache format v3: writer, reader, verify, resume, bad input, retention loss.

The first part uses synthetic tensors (no model); the end-to-end part builds caches from the tiny
offline pi0-fast (prefix and action tokens, the default) and checks that the teacher reproduces its own
cache and that a moved student's L_ret and gradient match a reference computed apart from the product.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import build_cache

import craft_ext
from craft_ext import ops
from craft_ext.anchors import (
    AnchorCache,
    AnchorCacheError,
    AnchorCacheWriter,
    AnchorLoader,
    AnchorSampler,
    BuildSettings,
    HiddenInfo,
    SourceInfo,
    TeacherInfo,
    check_compatible,
    read_manifest,
)
from craft_ext.anchors.manifest import FORMAT_VERSION, MANIFEST_NAME, shard_name
from craft_ext.anchors.shards import row_checksums, shard_tensors
from craft_ext.anchors.writer import PROGRESS_NAME
from craft_ext.engine.retention import row_distance

needs_kernels = pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built")

LAYERS, DIM, TOKENS = 2, 16, 6


def make_settings(rows=10, shard_size=4, pooling="pooled", dtype="float16", dim=DIM, **teacher) -> BuildSettings:
    identity = {"policy_type": "fake", "hidden_dim": dim, "num_layers": 4, "tokenizer": "tok-a", **teacher}
    return BuildSettings(
        teacher=TeacherInfo(path="/models/teacher", weights_sha256="ab" * 32, identity=identity),
        source=SourceInfo(repo_id="local/fake", root="/data/fake", frame_indices=list(range(0, 3 * rows, 3)), seed=0),
        hidden=HiddenInfo(layers=[2, 3], layers_requested=[-2, -1], pooling=pooling, dim=dim, dtype=dtype),
        preprocessing={"steps": ["normalize", "tokenize"]},
        shard_size=shard_size,
    )


def synthetic_shard(settings: BuildSettings, index: int):
    """Deterministic content for one shard (what a deterministic teacher would produce)."""
    rows = len(settings.shard_frames(index))
    g = torch.Generator().manual_seed(1000 + index)
    vectors = 2 if settings.hidden.pooling == "pooled" else TOKENS
    hidden = (3 * torch.randn(rows, LAYERS, vectors, settings.hidden.dim, generator=g) + 1).to(
        getattr(torch, settings.hidden.dtype)
    )
    mask = None
    if settings.hidden.pooling == "tokens":
        mask = torch.arange(TOKENS)[None, :] < torch.randint(1, TOKENS + 1, (rows, 1), generator=g)
    inputs = {
        "observation.images.top": torch.randint(0, 256, (rows, 3, 4, 4), generator=g, dtype=torch.uint8),
        "tokens": torch.randint(0, 900, (rows, TOKENS), generator=g),
    }
    return hidden, mask, inputs


def write_cache(directory: Path, settings: BuildSettings, *, stop_after: int | None = None, overwrite=False):
    writer = AnchorCacheWriter(directory, settings, overwrite=overwrite)
    for n, index in enumerate(list(writer.pending)):
        if stop_after is not None and n == stop_after:
            return writer
        writer.write_shard(index, *synthetic_shard(settings, index))
    writer.finalize()
    return writer


def all_rows(settings: BuildSettings):
    parts = [synthetic_shard(settings, k) for k in range(settings.num_shards)]
    hidden = torch.cat([p[0] for p in parts])
    mask = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
    inputs = {k: torch.cat([p[2][k] for p in parts]) for k in parts[0][2]}
    return hidden, mask, inputs


# -------------------------------------------------------------------------------------------------
# format, writer, reader


@pytest.mark.parametrize("pooling", ["pooled", "tokens"])
def test_roundtrip_random_rows_across_shards(tmp_path, pooling):
    settings = make_settings(pooling=pooling)
    write_cache(tmp_path, settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME] + [shard_name(k) for k in range(3)]
    cache = AnchorCache(tmp_path)
    assert len(cache) == 10
    hidden, mask, inputs = all_rows(settings)
    rows = [9, 0, 5, 4, 3, 8, 5, 6, 2]  # unsorted, all shards, a run across a shard edge (2..6), a repeat
    batch = cache.gather(rows)
    assert torch.equal(batch.hidden, hidden[rows])
    assert batch.hidden.dtype == torch.float16
    assert (batch.mask is None) == (pooling == "pooled")
    if mask is not None:
        assert torch.equal(batch.mask, mask[rows])
    assert batch.inputs.keys() == inputs.keys()
    for key in inputs:
        assert torch.equal(batch.inputs[key], inputs[key][rows])
    cache.verify()


@pytest.mark.parametrize("pooling", ["pooled", "tokens"])
def test_manifest_records_settings_and_teacher_statistics(tmp_path, pooling):
    settings = make_settings(pooling=pooling)
    write_cache(tmp_path, settings)
    manifest = read_manifest(tmp_path)
    assert manifest.format_version == FORMAT_VERSION == 3
    assert manifest.settings.to_json() == settings.to_json()
    assert manifest.num_rows == 10 and [s.rows for s in manifest.shards] == [4, 4, 2]
    assert manifest.num_vectors == (2 if pooling == "pooled" else TOKENS)
    assert manifest.inputs["observation.images.top"].dtype == "uint8"
    assert manifest.inputs["tokens"].shape == [TOKENS]
    hidden, mask, _ = all_rows(settings)
    x = hidden.double()  # [R, L, V, D]
    w = torch.ones(x.shape[0], x.shape[2], dtype=torch.float64) if mask is None else mask.double()
    for layer in range(LAYERS):
        vecs = x[:, layer][w.bool()]  # [N, D] valid vectors of this layer
        assert manifest.layer_mean[layer] == pytest.approx(vecs.mean().item(), rel=1e-9)
        assert manifest.layer_var[layer] == pytest.approx(vecs.var(dim=0, unbiased=False).mean().item(), rel=1e-9)
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert raw["format_version"] == 3
    assert raw["settings"]["hidden"]["layers_requested"] == [-2, -1]
    # each row's hash over its bytes in every stored tensor, 16 hex digits per row
    for k, record in enumerate(manifest.shards):
        assert len(record.row_xxh3) == 16 * record.rows
        expected = row_checksums(shard_tensors(*synthetic_shard(settings, k)))
        assert record.row_checksums().tolist() == expected.tolist()
        assert len(set(expected.tolist())) == record.rows


def test_unknown_format_version_is_refused(tmp_path):
    write_cache(tmp_path, make_settings())
    path = tmp_path / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 7  # written by a newer craft_ext: upgrading craft_ext is the fix
    path.write_text(json.dumps(data))
    with pytest.raises(AnchorCacheError, match="format version 7 is not supported.*upgrade craft_ext") as err:
        AnchorCache(tmp_path)
    assert "rebuild" not in str(err.value)
    for bad in (0, "2", None):  # not a version this project ever wrote
        data["format_version"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(AnchorCacheError, match="not a craft_ext anchor cache manifest"):
            AnchorCache(tmp_path)
    data["format_version"] = 2
    data["shards"][1]["row_xxh3"] = data["shards"][1]["row_xxh3"][:-16]  # one row's hash missing
    path.write_text(json.dumps(data))
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(1)) + " needs row_xxh3"):
        AnchorCache(tmp_path)
    path.write_text("{not json")
    with pytest.raises(AnchorCacheError, match="unreadable"):
        AnchorCache(tmp_path)


def test_missing_truncated_and_corrupt_shards(tmp_path):
    write_cache(tmp_path, make_settings())
    shard = tmp_path / shard_name(1)
    original = shard.read_bytes()

    shard.write_bytes(original[:-100])
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(1)) + ".*truncated"):
        AnchorCache(tmp_path)
    shard.write_bytes(original[:50])  # even the header is cut
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(1))):
        AnchorCache(tmp_path)

    corrupt = bytearray(original)
    corrupt[-7] ^= 0xFF  # same size, valid header, one flipped byte in the last row (local row 3, row 7)
    shard.write_bytes(bytes(corrupt))
    cache = AnchorCache(tmp_path)  # opening reads headers only
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(1)) + r" row 3 \(cache row 7\) is corrupt"):
        cache.gather([0, 7])
    assert cache.gather([0, 4, 5, 6, 8]).hidden.shape[0] == 5  # the other rows still read
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(1)) + " is corrupt: sha256"):
        cache.verify()

    shard.unlink()
    with pytest.raises(AnchorCacheError, match="missing.*" + re.escape(shard_name(1))):
        AnchorCache(tmp_path)
    with pytest.raises(AnchorCacheError, match="not found"):
        AnchorCache(tmp_path / "nowhere")


def test_interrupted_build_resumes_to_byte_identical_shards(tmp_path):
    settings = make_settings(rows=13, shard_size=3)  # 5 shards
    reference = tmp_path / "reference"
    write_cache(reference, settings)

    resumed = tmp_path / "resumed"
    write_cache(resumed, settings, stop_after=2)  # "killed" after two shards
    assert not (resumed / MANIFEST_NAME).exists(), "a manifest must never exist for an unfinished build"
    assert (resumed / PROGRESS_NAME).exists()
    (resumed / f".{shard_name(2)}.tmp").write_bytes(b"half a shard")  # cut off mid-write
    (resumed / shard_name(1)).write_bytes(b"garbage")  # and one finished shard went bad

    writer = AnchorCacheWriter(resumed, settings)
    assert writer.pending == [1, 2, 3, 4]  # continues from the first missing/invalid shard
    for index in list(writer.pending):
        writer.write_shard(index, *synthetic_shard(settings, index))
    writer.finalize()

    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in resumed.iterdir()) == names
    for name in names:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    AnchorCache(resumed).verify()
    assert AnchorCacheWriter(resumed, settings).pending == []  # complete: nothing to redo


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    write_cache(tmp_path, make_settings(pooling="pooled"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(AnchorCacheError, match="hidden.pooling: existing 'pooled', requested 'tokens'"):
        AnchorCacheWriter(tmp_path, make_settings(pooling="tokens"))
    with pytest.raises(AnchorCacheError, match="source.frame_indices"):
        AnchorCacheWriter(tmp_path, make_settings(rows=12))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing destroyed

    (tmp_path / "README.txt").write_text("mine")  # overwrite replaces the cache's own files only
    write_cache(tmp_path, make_settings(pooling="tokens"), overwrite=True)
    assert read_manifest(tmp_path).settings.hidden.pooling == "tokens"
    assert (tmp_path / "README.txt").read_text() == "mine"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(AnchorCacheError, match="not empty and is not an anchor cache"):
            AnchorCacheWriter(foreign, make_settings(), overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_writer_input(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(AnchorCacheError, match="cannot create the output directory"):
        AnchorCacheWriter(blocker / "cache", make_settings())
    with pytest.raises(AnchorCacheError, match="at least one anchor row"):
        AnchorCacheWriter(tmp_path / "empty", make_settings(rows=0))
    settings = make_settings()
    writer = AnchorCacheWriter(tmp_path / "c", settings)
    hidden, mask, inputs = synthetic_shard(settings, 0)
    with pytest.raises(ValueError, match="hidden dtype must be float16"):
        writer.write_shard(0, hidden.float(), mask, inputs)
    with pytest.raises(ValueError, match="rows=4"):
        writer.write_shard(0, hidden[:3], mask, inputs)
    overflow = hidden.clone()
    overflow[0, 0, 0, 0] = float("inf")
    with pytest.raises(AnchorCacheError, match="NaN or Inf.*bfloat16"):
        writer.write_shard(0, overflow, mask, inputs)
    with pytest.raises(AnchorCacheError, match="not written yet"):
        writer.finalize()
    assert not (tmp_path / "c" / MANIFEST_NAME).exists()


def _mapped_rss_kib(directory: Path) -> int:
    """Resident KiB of this process's memory mappings of files in ``directory`` (from smaps):
    pages of a mapped shard become resident only when read."""
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            fields = line.split()
            current = fields[5] if len(fields) >= 6 else None
        elif line.startswith("Rss:") and current and str(directory) in current:
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc/self/smaps")
def test_random_batch_reads_only_its_rows(tmp_path):
    # 256 KiB rows, 4 shards of 8 MiB. The kernel maps page-cache folios of up to 2 MiB per fault,
    # so each row read may make ~2 MiB resident: 4 rows from 4 shards stay well under half the cache.
    settings = make_settings(rows=128, shard_size=32, dtype="float32", dim=16384)
    write_cache(tmp_path, settings)
    total_kib = sum(p.stat().st_size for p in tmp_path.glob("shard-*")) // 1024
    cache = AnchorCache(tmp_path)
    assert _mapped_rss_kib(tmp_path) < total_kib / 4, "opening must not read the shards"
    batch = cache.gather([3, 40, 70, 100])
    touched = _mapped_rss_kib(tmp_path)
    assert batch.hidden.abs().sum() > 0
    assert touched < total_kib / 2, f"a 4-row batch touched {touched} KiB of a {total_kib} KiB cache"
    # The measurement can fail: reading every row makes the whole cache resident.
    cache.gather(range(len(cache)))
    assert _mapped_rss_kib(tmp_path) > 0.9 * total_kib


def test_sampler_is_deterministic_and_resumable():
    sampler = AnchorSampler(10, 4, seed=3)
    first = [sampler.next_rows() for _ in range(5)]  # 20 rows = two full epochs
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))
    again = AnchorSampler(10, 4, seed=3)
    assert [again.next_rows() for _ in range(5)] == first
    assert AnchorSampler(10, 4, seed=4).next_rows() != first[0]

    resumed = AnchorSampler(10, 4, seed=3)
    probe = AnchorSampler(10, 4, seed=3)
    probe.next_rows(), probe.next_rows()
    resumed.load_state_dict(probe.state_dict())
    assert [resumed.next_rows() for _ in range(3)] == first[2:]
    with pytest.raises(ValueError, match="cache of 10 rows, this one has 11"):
        AnchorSampler(11, 4).load_state_dict(probe.state_dict())


def test_loader_prefetches_and_resumes_exactly(tmp_path):
    settings = make_settings(rows=10)
    write_cache(tmp_path, settings)
    cache = AnchorCache(tmp_path)
    with AnchorLoader(cache, AnchorSampler(len(cache), 3, seed=1), prefetch=3) as loader:
        batches = [next(loader) for _ in range(6)]
    with AnchorLoader(cache, AnchorSampler(len(cache), 3, seed=1)) as loader:
        for _ in range(2):
            next(loader)
        state = loader.state_dict()  # after 2 consumed, however many were prefetched
    with AnchorLoader(cache, AnchorSampler(len(cache), 3, seed=1)) as loader:
        loader.load_state_dict(state)
        rest = [next(loader) for _ in range(4)]
    for a, b in zip(batches[2:], rest):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.hidden, b.hidden)
    hidden, _, _ = all_rows(settings)
    assert torch.equal(batches[0].hidden, hidden[batches[0].rows])


def test_loader_reports_read_errors(tmp_path):
    write_cache(tmp_path, make_settings())
    cache = AnchorCache(tmp_path)
    cache._slices[0]["hidden"] = None  # simulate an I/O failure inside the prefetch thread
    with AnchorLoader(cache, AnchorSampler(len(cache), 10, seed=0)) as loader:
        with pytest.raises(TypeError):
            next(loader)


# -------------------------------------------------------------------------------------------------
# validation against a student


class FakeAdapter:
    policy_type = "fake"

    def __init__(self, dim=DIM, layers=4, tokenizer="tok-a", weights="cd" * 32):
        self.hidden_dim, self.num_layers = dim, layers
        self._identity = {"policy_type": "fake", "hidden_dim": dim, "num_layers": layers, "tokenizer": tokenizer}
        self._identity["weights_sha256"] = weights

    def identity(self):
        return dict(self._identity)

    def resolve_layers(self, layers):
        return [x % self.num_layers for x in layers]


def test_check_compatible_names_each_mismatch(tmp_path):
    write_cache(tmp_path, make_settings())
    manifest = read_manifest(tmp_path)
    check_compatible(manifest, FakeAdapter(), pooling="pooled", layers=[-2, -1])  # other weights: fine
    with pytest.raises(AnchorCacheError, match="hidden_dim: cache has 16, student has 32"):
        check_compatible(manifest, FakeAdapter(dim=32))
    with pytest.raises(AnchorCacheError, match="tokenizer: cache has 'tok-a', student has 'tok-b'"):
        check_compatible(manifest, FakeAdapter(tokenizer="tok-b"))
    with pytest.raises(AnchorCacheError, match=r"layers: cache has layers \[2, 3\], student has only 3"):
        check_compatible(manifest, FakeAdapter(layers=3))
    with pytest.raises(AnchorCacheError, match="pooling: cache has 'pooled', student has 'tokens'"):
        check_compatible(manifest, FakeAdapter(), pooling="tokens")
    with pytest.raises(AnchorCacheError, match=r"layers: cache has \[2, 3\], student has \[1, 2\]"):
        check_compatible(manifest, FakeAdapter(), layers=[1, 2])


# -------------------------------------------------------------------------------------------------
# retention distance on synthetic tensors


def _reference_rows(student, teacher, mask, distance, var):
    s, t = student.double(), teacher.double()
    w = torch.ones(s.shape[0], s.shape[2], dtype=torch.float64) if mask is None else mask.double()
    if distance == "cosine":
        d = 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)  # [B, L, V]
        return (d * w[:, None]).sum((1, 2)) / (w.sum(1) * s.shape[1]).clamp_min(1)
    per_layer = torch.stack(
        [ops.hidden_mse_reference(student[:, layer], teacher[:, layer], mask).double() for layer in range(s.shape[1])], 1
    )
    if distance == "normalized_mse":
        per_layer = per_layer / torch.tensor(var, dtype=torch.float64)
    return per_layer.mean(1)


@needs_kernels
@pytest.mark.parametrize("distance", ["normalized_mse", "mse", "cosine"])
@pytest.mark.parametrize("masked", [False, True])
def test_row_distance_and_gradient_match_reference(distance, masked):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 3, 7, 8, generator=g).half()
    student = (teacher.float() + 0.2 * torch.randn(5, 3, 7, 8, generator=g)).requires_grad_()
    mask = None
    if masked:
        mask = torch.rand(5, 7, generator=g) > 0.4
        mask[-1] = False  # a row with nothing to compare: loss 0, gradient 0
    var = [0.5, 2.0, 4.0]
    got = row_distance(student, teacher, mask, distance=distance, layer_var=var)
    want = _reference_rows(student, teacher, mask, distance, var)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(got.mean(), student)
    (grad_ref,) = torch.autograd.grad(want.mean(), student)
    torch.testing.assert_close(grad, grad_ref.float(), rtol=1e-4, atol=1e-7)
    if masked:
        assert got[-1] == 0 and grad[-1].abs().sum() == 0
    assert row_distance(teacher.float(), teacher, mask, distance=distance, layer_var=var).abs().max() < 1e-6


def test_row_distance_bad_input():
    x = torch.zeros(1, 1, 2, 3)
    with pytest.raises(ValueError, match="distance must be one of"):
        row_distance(x, x, None, distance="l1", layer_var=[1.0])
    with pytest.raises(ValueError, match="variance"):
        row_distance(x, x, None, distance="normalized_mse", layer_var=[0.0])


# -------------------------------------------------------------------------------------------------
# end to end on the tiny offline pi0-fast


@pytest.fixture(scope="module")
def teacher(kit):
    from craft_ext.policies import make_adapter
    from craft_ext.policies.loading import load_policy

    policy = load_policy(kit.policy)
    return policy, make_adapter(policy)


def build_tiny(kit, out: Path, pooling: str) -> Path:
    """16 anchors of the kit's teacher in shards of 6 (three shards, the last one partial), anchoring what
    the cache CLI anchors by default (pi0-fast: the prefix and the teacher's own action tokens)."""
    return build_cache(kit, out, num_anchors=16, pooling=pooling, shard_size=6, batch_size=4, device="cpu")


@pytest.fixture(scope="module", params=["pooled", "tokens"])
def tiny_cache(request, kit, tmp_path_factory):
    return build_tiny(kit, tmp_path_factory.mktemp(f"cache_{request.param}"), request.param)


@needs_kernels
def test_teacher_reproduces_its_cache_on_every_row(tiny_cache, teacher):
    from craft_ext.engine.retention import retention_loss, retention_per_row

    _, adapter = teacher
    cache = AnchorCache(tiny_cache)
    cache.verify()
    manifest = cache.manifest
    check_compatible(manifest, adapter, pooling=manifest.settings.hidden.pooling, layers=[-2, -1])
    assert manifest.settings.hidden.layers == [adapter.num_layers - 2, adapter.num_layers - 1]
    assert manifest.num_vectors == (2 if manifest.settings.hidden.pooling == "pooled" else cache.gather([0]).mask.shape[1])
    assert all(v > 0 for v in manifest.layer_var)
    batch = cache.gather(range(len(cache)))
    with torch.no_grad():
        for distance in ("normalized_mse", "mse", "cosine"):
            per_row = retention_per_row(adapter, batch, manifest, distance=distance)
            assert per_row.shape == (16,)
            assert per_row.abs().max() <= 1e-6, (distance, per_row)
        assert retention_loss(adapter, batch, manifest).abs() <= 1e-6


def _reference_features(policy, inputs, layers, pooling):
    """term -> (values [B, L, V, D], mask [B, V] or None) of the prefix and the action tokens, computed
    apart from the adapter: lerobot's own embedding of the training sequence [images; prompt; FAST
    tokens], the language model's own `output_hidden_states` (its final norm bypassed: the anchored
    states are the raw residual stream), and pooling written out here."""
    from lerobot.policies.common.vla_utils import prepare_attention_masks_4d
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    from craft_ext.policies.base import ACTION_TOKEN_MASK_KEY, ACTION_TOKENS_KEY

    class NoNorm(torch.nn.Module):
        def forward(self, x, cond=None):
            return x, None

    cameras = [k for k in policy.config.image_features if k in inputs]
    images, img_masks = policy._preprocess_images({k: inputs[k].float() / 255.0 for k in cameras})
    tokens, token_mask = inputs[OBS_LANGUAGE_TOKENS], inputs[OBS_LANGUAGE_ATTENTION_MASK]
    actions, action_mask = inputs[ACTION_TOKENS_KEY], inputs[ACTION_TOKEN_MASK_KEY]
    embs, pad, att, n_image, n_actions = policy.model.embed_prefix_fast(
        images, img_masks, tokens, token_mask, fast_action_tokens=actions, fast_action_masks=action_mask
    )
    language_model = policy.model.paligemma_with_expert.paligemma.model.language_model
    norm, language_model.norm = language_model.norm, NoNorm()
    try:
        out = language_model(inputs_embeds=embs, attention_mask=prepare_attention_masks_4d(att, dtype=embs.dtype),
                             position_ids=torch.cumsum(pad, dim=1) - 1, output_hidden_states=True, use_cache=False)
    finally:
        language_model.norm = norm
    hidden = torch.stack([out.hidden_states[layer + 1] for layer in layers], dim=1)  # [B, L, S, D]: layer outputs
    length = hidden.shape[2] - n_actions
    prefix_mask = pad[:, :length].bool()
    image = torch.zeros_like(prefix_mask)
    image[:, :n_image] = True

    def pooled(states, valid, mean_over, last_of):
        if pooling == "tokens":
            return states * valid[:, None, :, None], valid
        w = (mean_over & valid).double()
        mean = (states.double() * w[:, None, :, None]).sum(2) / w.sum(1)[:, None, None]
        last = [int(torch.nonzero(row & valid[b])[-1]) for b, row in enumerate(last_of)]
        return torch.stack([mean, states.double()[torch.arange(len(last)), :, last]], dim=2), None

    return {
        "prefix": pooled(hidden[:, :, :length], prefix_mask, image, ~image),
        "action_tokens": pooled(hidden[:, :, length:], action_mask.bool(), action_mask.bool(), action_mask.bool()),
    }


@needs_kernels
def test_perturbed_student_loss_and_gradient_match_reference(tiny_cache, teacher):
    """L_ret of a perturbed student, and its gradient, against a reference computed apart from the product
    (`_reference_features`): each term's per-layer MSE over its valid vectors divided by the teacher's
    per-layer variance, the mean over layers, the weighted mean over terms (weight 1 each by default),
    the mean over rows."""
    import copy

    from craft_ext.engine.retention import retention_loss
    from craft_ext.policies import make_adapter

    policy, _ = teacher
    student = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    adapter = make_adapter(student)
    cache = AnchorCache(tiny_cache)
    manifest, hidden = cache.manifest, cache.manifest.settings.hidden
    assert manifest.terms == ["prefix", "action_tokens"] and manifest.weights() == {"prefix": 1.0, "action_tokens": 1.0}
    batch = cache.gather([0, 5, 6, 11, 15])
    params = [p for p in student.parameters() if p.requires_grad]

    loss = retention_loss(adapter, batch, manifest)
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    features = _reference_features(student, batch.inputs, hidden.layers, hidden.pooling)
    teacher_values = {"prefix": (batch.hidden, batch.mask),
                      "action_tokens": (batch.targets["action_tokens"], batch.targets.get("action_tokens.mask"))}
    per_term = {}
    for term, (values, mask) in features.items():
        target, target_mask = teacher_values[term]
        if mask is not None:  # tokens mode: the stored mask is the teacher's, and the same
            assert torch.equal(mask, target_mask), term
        per_layer = torch.stack(
            [ops.hidden_mse_reference(values[:, i], target[:, i], mask).double() for i in range(values.shape[1])], 1
        )
        per_term[term] = (per_layer / torch.tensor(manifest.term_variance(term), dtype=torch.float64)).mean(1)
        assert per_term[term].mean().item() > 1e-4, term  # every term moved
    weights = manifest.weights()
    reference = (sum(weights[t] * per_term[t] for t in per_term) / sum(weights.values())).mean()
    grads_ref = torch.autograd.grad(reference, params, allow_unused=True)

    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
    pairs = [(a, b) for a, b in zip(grads, grads_ref) if b is not None]
    assert len(pairs) > 10 and all(a is not None for a, _ in pairs)
    flat = torch.cat([a.reshape(-1) for a, _ in pairs])
    flat_ref = torch.cat([b.reshape(-1) for _, b in pairs]).to(flat.dtype)
    assert flat_ref.abs().max() > 0
    # elementwise, with an absolute floor at 1e-5 of the largest gradient (float32 noise on ~0 entries)
    torch.testing.assert_close(flat, flat_ref, rtol=1e-4, atol=1e-5 * flat_ref.abs().max().item())


def test_interrupted_tiny_build_resumes_to_identical_bytes(kit, tmp_path, monkeypatch):
    reference = build_tiny(kit, tmp_path / "reference", "tokens")

    original = AnchorCacheWriter.write_shard
    calls = []

    def killed_after_two(self, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the third shard
        calls.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AnchorCacheWriter, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_tiny(kit, tmp_path / "resumed", "tokens")
    monkeypatch.undo()
    resumed = tmp_path / "resumed"
    assert not (resumed / MANIFEST_NAME).exists()
    assert sorted(p.name for p in resumed.glob("shard-*")) == [shard_name(0), shard_name(1)]

    build_tiny(kit, resumed, "tokens")
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in resumed.iterdir()) == names
    for name in names:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name

    shard = resumed / shard_name(2)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(2)) + " is corrupt"):
        AnchorCache(resumed).verify()
