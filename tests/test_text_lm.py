"""The byte-level standard-library corpus (descend.data.text) and the causal transformer LM (descend.nn)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from descend.data.registry import load_data
from descend.data.text import load_stdlib_text, stdlib_files
from descend.nn import TransformerLM


@pytest.fixture(scope="module")
def bundle():
    return load_stdlib_text(0)


def test_corpus_is_deterministic_split_by_file_and_shifted_by_one(bundle) -> None:
    again = load_stdlib_text(0)
    assert again.info["sha256"] == bundle.info["sha256"]
    assert torch.equal(again.val.inputs[0], bundle.val.inputs[0])
    assert load_stdlib_text(1).info["sha256"] != bundle.info["sha256"]  # another seed, another split
    names = bundle.info["file_names"]
    assert not set(names["train"]) & set(names["val"]) and not set(names["train"]) & set(names["test"])
    assert not set(names["val"]) & set(names["test"])
    assert all("site-packages" not in n and "/test/" not in f"/{n}" for split in names.values() for n in split)
    x, y = bundle.train.inputs[0], bundle.train.targets
    assert x.dtype == torch.long and x.shape == y.shape and x.shape[1] == bundle.info["context"]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one byte
    assert 0 <= int(x.min()) and int(x.max()) < 256
    assert bundle.info["bytes"]["train"] == 1_000_000 and bundle.task == "classification"


def test_files_are_sorted_and_found_by_the_registry(bundle) -> None:
    files = stdlib_files()
    assert len(files) > 100 and list(files) == sorted(files, key=lambda p: p.as_posix())
    named = load_data("stdlib-text")
    assert named.info["sha256"] == bundle.info["sha256"] and named.input_kind == "tokens"


def _model(seed: int = 0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(256, 16, width=32, depth=2, heads=4, **kw)


def test_transformer_is_causal() -> None:
    model = _model().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :9], b[:, :9])  # positions before the change see none of it
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_attention_matches_an_explicit_masked_softmax() -> None:
    attn = _model().blocks[0].attn
    x = torch.randn(3, 10, 32)
    B, T, W, H = 3, 10, 32, 4
    q, k, v = attn.qkv(x).view(B, T, 3, H, W // H).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(W // H)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, W))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_output_projection_is_the_embedding_and_initial_loss_is_uniform() -> None:
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    assert not any("head" in n or "lm_" in n for n in names)  # no separate output matrix: tied
    idx = torch.randint(0, 256, (4, 16))
    with torch.no_grad():
        before = model(idx)
        model.embed.weight[7] += 1.0
        after = model(idx)
    assert not torch.allclose(before[..., 7], after[..., 7])  # the logit of byte 7 reads embedding row 7
    other = torch.randint(0, 256, (4 * 16,))
    loss = F.cross_entropy(before.reshape(-1, 256), other)
    assert abs(float(loss) - math.log(256)) < 0.1  # near-uniform predictions of unrelated bytes at initialisation
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_a_few_adam_steps_learn_the_byte_statistics(bundle) -> None:
    torch.manual_seed(0)
    model = TransformerLM(256, bundle.info["context"], width=32, depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = bundle.train.inputs[0], bundle.train.targets
    g = torch.Generator().manual_seed(0)

    def val_loss() -> float:
        with torch.no_grad():
            logits = model(bundle.val.inputs[0][:200])
            return float(F.cross_entropy(logits.reshape(-1, 256), bundle.val.targets[:200].reshape(-1)))

    start = val_loss()
    for _ in range(30):
        i = torch.randint(0, len(x), (16,), generator=g)
        loss = F.cross_entropy(model(x[i]).reshape(-1, 256), y[i].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert val_loss() < start - 1.0  # from ln 256 ≈ 5.5 towards the unigram entropy of Python source


def test_descend_train_builds_the_transformer_for_token_data(bundle) -> None:
    from descend.train import build_model

    model = build_model("transformer", bundle, depth=1, width=32)
    assert isinstance(model, TransformerLM) and model.context == bundle.info["context"]
    with pytest.raises(ValueError, match="use --model transformer"):
        build_model("mlp", bundle)
    with pytest.raises(ValueError, match="needs token sequences"):
        build_model("transformer", load_data("digits"))


# --- sampling -------------------------------------------------------------------------------------------------


def _lm(context: int = 16, dtype: torch.dtype = torch.float64) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(256, context, width=32, depth=2, heads=4).to(dtype)
    with torch.no_grad():  # larger weights than the init's, so the logits are far from uniform
        for p in model.parameters():
            p.mul_(8.0)
    return model


def test_cached_forward_equals_the_full_forward_position_by_position() -> None:
    from descend.nn import KVCache

    model = _lm().eval()
    idx = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    full = model(idx)
    cache = KVCache(len(model.blocks))
    pieces = [model(idx[:, :5], cache), model(idx[:, 5:6], cache), model(idx[:, 6:12], cache)]  # 5, 1, then 6 at once
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="exceeds the model's context 16"):
        model(idx[:, :5], cache)  # 12 held + 5 new > 16


@pytest.mark.parametrize("prompt_len,tokens", [(3, 20), (16, 5), (40, 6)])  # within, at and past the context
def test_generate_samples_the_same_text_with_and_without_the_cache(prompt_len: int, tokens: int) -> None:
    model = _lm()
    prompt = torch.randint(0, 256, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    runs = [model.generate(prompt, tokens, top_k=50, generator=torch.Generator().manual_seed(7), use_cache=c)
            for c in (True, False)]
    assert runs[0].shape == (2, prompt_len + tokens) and torch.equal(runs[0][:, :prompt_len], prompt)
    assert torch.equal(runs[0], runs[1])
    other_seed = model.generate(prompt, tokens, top_k=50, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other_seed, runs[0])
    assert model.training  # the mode is restored


def test_generate_follows_the_model_one_token_at_a_time() -> None:
    """Greedy decoding, checked against the argmax of a fresh full forward pass at every step."""
    model = _lm(context=8).eval()
    text = torch.tensor([[10, 20, 30]])
    out = model.generate(text, 12, temperature=0)
    for t in range(3, 15):
        window = out[:, max(0, t - 8) : t]  # the last `context` tokens before position t
        assert int(out[0, t]) == int(model(window)[0, -1].argmax())


def test_sample_next_restricts_to_top_k_and_top_p() -> None:
    from descend.nn import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {int(sample_next(logits, generator=g, **kw)) for _ in range(400)}  # noqa: E731
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.5) == {0}  # the most likely token alone reaches 0.5
    assert draw(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draw(temperature=0) == {0}
    counts = torch.bincount(torch.cat([sample_next(logits.expand(4000, 4), generator=g) for _ in range(5)])[:, 0])
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    torch.testing.assert_close(counts.double() / counts.sum(), expected, atol=0.01, rtol=0)
    for bad, message in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p")]:
        with pytest.raises(ValueError, match=message):
            sample_next(logits, **bad)


# --- your own text ------------------------------------------------------------------------------------------------


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_text_file_splits_are_contiguous_disjoint_spans_read_from_disk(tmp_path) -> None:
    import hashlib

    from descend.data.text import load_text_files

    text = bytes(range(32, 127)) * 200  # 19,000 bytes of printable ASCII
    file = _write(tmp_path / "corpus.txt", text)
    bundle = load_text_files(file, context=15, eval_fraction=0.1)
    info = bundle.info
    assert info["files"] == [{"name": "corpus.txt", "bytes": len(text), "sha256": hashlib.sha256(text).hexdigest()}]
    assert info["spans"] == {"train": [["corpus.txt", 0, 15200]], "val": [["corpus.txt", 15200, 17100]],
                             "test": [["corpus.txt", 17100, 19000]]}
    for name, (_, a, b) in ((k, v[0]) for k, v in info["spans"].items()):
        split = getattr(bundle, name)
        assert len(split) == (b - a) // 16
        for i in (0, len(split) - 1):
            x, y = split[i]
            window = torch.tensor(list(text[a + 16 * i : a + 16 * (i + 1)]))
            assert torch.equal(x, window[:-1]) and torch.equal(y, window[1:]) and x.dtype == torch.long
    import pickle

    again = pickle.loads(pickle.dumps(bundle.val))  # a DataLoader worker gets a copy that reopens the file
    assert torch.equal(again[3][0], bundle.val[3][0])


def test_a_directory_is_its_text_files_in_order_and_no_window_crosses_a_file(tmp_path) -> None:
    from descend.data.text import load_text_files

    _write(tmp_path / "b.txt", b"b" * 1000)
    _write(tmp_path / "a" / "x.md", b"a" * 1000)
    _write(tmp_path / ".git" / "HEAD", b"ref: x\n" * 100)  # hidden: left out
    _write(tmp_path / "logo.png", b"\x89PNG\x00\x01" * 100)  # not text: left out, and said so
    bundle = load_text_files(tmp_path, context=9, eval_fraction=0.2)
    assert [f["name"] for f in bundle.info["files"]] == ["a/x.md", "b.txt"]
    assert list(bundle.info["skipped"]) == ["logo.png"] and "NUL" in bundle.info["skipped"]["logo.png"]
    # 2,000 bytes: train [0, 1200) = all of a/x.md and b.txt's first 200; val and test 400 each of b.txt
    assert bundle.info["spans"]["train"] == [["a/x.md", 0, 1000], ["b.txt", 0, 200]]
    assert len(bundle.train) == 100 + 20
    assert {bytes(bundle.train[i][0].tolist()) for i in range(len(bundle.train))} == {b"a" * 9, b"b" * 9}


@pytest.mark.parametrize("data,message", [
    (b"", "is empty"),
    (b"abc\x00def" * 100, "NUL byte"),
    (b"caf\xe9" * 100, "offset 3 are not UTF-8"),
    (b"x" * 50, "too few"),
])
def test_a_file_that_is_not_usable_text_gets_one_line(tmp_path, data: bytes, message: str) -> None:
    from descend.data.tabular import DataError
    from descend.data.text import load_text_files

    with pytest.raises(DataError, match=message) as info:
        load_text_files(_write(tmp_path / "f.txt", data), context=16)
    assert "\n" not in str(info.value)


def test_the_registry_reads_a_text_file_or_directory(tmp_path) -> None:
    from descend.data.tabular import DataError

    _write(tmp_path / "d" / "one.txt", b"hello world\n" * 500)
    by_file, by_dir = load_data(str(tmp_path / "d" / "one.txt")), load_data(str(tmp_path / "d"))
    assert by_file.input_kind == by_dir.input_kind == "tokens" and by_file.out_features == 256
    assert by_file.info["files"] == by_dir.info["files"] and by_file.info["context"] == 64
    with pytest.raises(DataError, match="drop --target"):
        load_data(str(tmp_path / "d"), target="y")


def test_training_accuracy_of_sequences_is_the_share_of_positions_right() -> None:
    from descend.data._base import Split
    from descend.train import accumulate_gradient

    torch.manual_seed(0)
    model = TransformerLM(256, 8, width=16, depth=1, heads=2)
    windows = torch.randint(0, 256, (6, 9), generator=torch.Generator().manual_seed(4))
    split = Split((windows[:, :-1],), windows[:, 1:])
    _, correct = accumulate_gradient(model, lambda o, t: F.cross_entropy(o.reshape(-1, 256), t.reshape(-1)),
                                     split, [slice(0, 6)], count_correct=True)
    with torch.no_grad():
        hits = (model(split.inputs[0]).argmax(-1) == split.targets).double()
    assert float(correct) == pytest.approx(float(hits.mean(1).sum()))  # / 6 examples = the token accuracy
    assert 0 <= float(correct) <= 6
