"""KV-cache generation: greedy parity with transformers, sampling log-probs and filters, EOS, seeds, buckets."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign import generate as gen
from jalign.models.hf_io import load_hf_params, model_config_from_hf
from jalign.models.transformer import forward, lm_logits
from sharding import DEFAULT_RULES, make_mesh, use_rules

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB = 256
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 103]]
MAX_NEW = 40  # new-token bucket 64, like the greedy parity test: the samplers share one executable


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny Llama-3 (rope scaling) with a sharpened head so sampling has real structure."""
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(40.0)
    hf.save_pretrained(d, safe_serialization=True)
    cfg = model_config_from_hf(d)
    return hf, d, cfg, load_hf_params(d, cfg)


def fresh_logits(params, cfg, prompts, tokens, lengths):
    """Logits predicting each generated token, from one uncached forward over prompt + response."""
    seqs = [list(p) + list(tokens[b, :lengths[b]]) for b, p in enumerate(prompts)]
    T = max(map(len, seqs))
    ids = np.zeros((len(seqs), T), np.int32)
    seg = np.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], seg[b, :len(s)] = s, 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), ids.shape)
    logits = np.asarray(lm_logits(params, forward(params, ids, pos, seg, cfg), cfg))
    out = np.zeros((len(seqs), tokens.shape[1], logits.shape[-1]), np.float32)
    for b, p in enumerate(prompts):
        n = lengths[b]
        out[b, :n] = logits[b, len(p) - 1:len(p) - 1 + n]
    return out


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def allowed_set(scaled, top_k, top_p, slack=1e-4):
    """Reference filter: top-k, then the smallest most-probable set with mass >= top_p; bool [V]."""
    keep = np.ones_like(scaled, bool)
    if top_k:
        keep &= scaled >= np.sort(scaled)[-top_k] - slack
    x = np.where(keep, scaled, -np.inf)
    order = np.argsort(-x)
    p = np.exp(log_softmax(x))[order]
    n = int(np.searchsorted(np.cumsum(p), top_p - 1e-6) + 1)
    return keep & (x >= x[order[n - 1]] - slack)


def test_greedy_matches_transformers(model):
    hf, _, cfg, params = model
    out = gen.generate(params, cfg, PROMPTS, max_new_tokens=64, greedy=True, eos_ids=(2,), min_new_tokens=64)
    T = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=64, min_new_tokens=64,
                          eos_token_id=2, pad_token_id=0)[:, T:].numpy()
    np.testing.assert_array_equal(out["tokens"], ref)
    assert out["lengths"].tolist() == [64, 64, 64] and not out["ended_with_eos"].any()
    assert len(set(ref[0].tolist())) > 3  # not a degenerate constant sequence


def test_sampled_logprobs_match_fresh_forward(model):
    _, _, cfg, params = model
    T = 0.7
    out = gen.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, temperature=T, rng=3)
    assert out["tokens"].shape == (3, MAX_NEW) and out["lengths"].tolist() == [MAX_NEW] * 3
    logits = fresh_logits(params, cfg, PROMPTS, out["tokens"], out["lengths"])
    want = np.take_along_axis(log_softmax(logits / T), out["tokens"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs_tempered"], want, atol=2e-4)
    np.testing.assert_allclose(out["logprobs"], want, atol=2e-4)  # no filter: the same distribution
    assert (want < -1e-3).mean() > 0.3  # genuinely stochastic choices


def test_top_k_top_p_stay_in_allowed_set(model):
    _, _, cfg, params = model
    T, k, p = 1.5, 12, 0.7
    out = gen.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, temperature=T, top_k=k, top_p=p, rng=5)
    logits = fresh_logits(params, cfg, PROMPTS, out["tokens"], out["lengths"])
    sizes = []
    for b in range(3):
        for i in range(MAX_NEW):
            scaled = logits[b, i] / T
            allowed = allowed_set(scaled, k, p)
            tok = out["tokens"][b, i]
            assert allowed[tok], (b, i, tok)
            sizes.append(allowed.sum())
            strict = allowed_set(scaled, k, p, slack=0.0)
            ref_lp = log_softmax(np.where(strict, scaled, -np.inf))[tok]
            np.testing.assert_allclose(out["logprobs"][b, i], ref_lp, atol=2e-3)
            np.testing.assert_allclose(out["logprobs_tempered"][b, i], log_softmax(scaled)[tok], atol=2e-4)
    assert 1 < np.mean(sizes) < k  # the nucleus really cuts inside the top-k


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (7, 1.0), (7, 0.3)])
def test_filter_logits_matches_reference(top_k, top_p):
    x = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    got = np.asarray(gen.filter_logits(jnp.asarray(x), top_k=top_k, top_p=top_p if top_p < 1 else None))
    for b in range(4):
        np.testing.assert_array_equal(np.isfinite(got[b]), allowed_set(x[b], top_k, top_p, slack=0.0))
    sup = np.asarray(gen.filter_logits(jnp.asarray(x), suppress=jnp.array([True, False, True, False]),
                                       end_ids=jnp.array([3, 9, -1, -1])))
    assert np.isinf(sup[[0, 2]][:, [3, 9]]).all() and np.isfinite(sup[[1, 3]]).all()


def test_eos_ends_rows_and_min_new_tokens(model):
    _, _, cfg, params = model
    base = gen.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0, rng=11)
    # The same seed draws the same tokens until a row ends, so each row must stop at its first end token.
    eos, stop = int(base["tokens"][0, 4]), int(base["tokens"][2, 9])
    out = gen.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0, rng=11, eos_ids=(eos,),
                       stop_ids=(stop,), pad_id=VOCAB - 1)
    for b in range(3):
        row = base["tokens"][b].tolist()
        hits = [i for i, t in enumerate(row) if t in (eos, stop)]
        n = hits[0] + 1 if hits else MAX_NEW
        assert out["lengths"][b] == n and bool(out["ended_with_eos"][b]) == bool(hits)
        assert out["tokens"][b, :n].tolist() == row[:n]
        assert (out["tokens"][b, n:] == VOCAB - 1).all()
        assert (out["logprobs"][b, n:] == 0).all() and (out["logprobs_tempered"][b, n:] == 0).all()
    assert out["lengths"][0] <= 5 and out["ended_with_eos"][0]
    late = gen.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0, rng=11, eos_ids=(eos,),
                        stop_ids=(stop,), min_new_tokens=12)
    for b in range(3):
        n = late["lengths"][b]
        assert n >= 12 and not np.isin(late["tokens"][b, :min(n, 12)], [eos, stop]).any()
        if late["ended_with_eos"][b]:
            assert late["tokens"][b, n - 1] in (eos, stop)


def test_same_seed_same_output_and_no_recompile(model):
    _, _, cfg, params = model
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.9)
    a = gen.generate(params, cfg, PROMPTS, rng=7, **kw)
    n = gen.compiled_cache_size()
    b = gen.generate(params, cfg, PROMPTS, rng=7, **kw)
    c = gen.generate(params, cfg, PROMPTS, rng=8, **kw)
    d = gen.generate(params, cfg, [[9] * 30, [4, 5], [6], PROMPTS[0]], rng=7, max_new_tokens=MAX_NEW - 3,
                     temperature=0.5, eos_ids=(1, 2, 3))  # other lengths, same buckets
    assert gen.compiled_cache_size() == n
    for k in ("tokens", "logprobs", "logprobs_tempered", "lengths"):
        np.testing.assert_array_equal(a[k], b[k])
    assert (a["tokens"] != c["tokens"]).any()
    assert d["tokens"].shape == (4, MAX_NEW - 3)


def test_bucket_sizes_do_not_change_greedy_output(model):
    _, _, cfg, params = model
    ref = gen.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, greedy=True)
    small = gen.generate(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, greedy=True, prompt_bucket=16,
                         batch_bucket=False)
    np.testing.assert_array_equal(ref["tokens"], small["tokens"])
    np.testing.assert_allclose(ref["logprobs"], small["logprobs"], atol=1e-4)
    # a row's output does not depend on the other rows in the batch
    solo = gen.generate(params, cfg, PROMPTS[1:2], max_new_tokens=MAX_NEW, greedy=True, prompt_bucket=16,
                        batch_bucket=False)
    np.testing.assert_array_equal(solo["tokens"][0], ref["tokens"][1])


def test_generate_on_mesh_matches_single_device(model):
    _, d, cfg, params = model
    mesh = make_mesh(data=2, fsdp=2, tensor=2, sequence=1)
    sharded = load_hf_params(d, cfg, mesh=mesh)
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.8, rng=1)
    a = gen.generate(params, cfg, PROMPTS, **kw)
    b = gen.generate(sharded, cfg, PROMPTS, mesh=mesh, **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_allclose(a["logprobs_tempered"], b["logprobs_tempered"], atol=1e-4)
    # The KV cache [L, B=4, S=64+64, KV=2, hd=16] lives as [L, 1, S, 1, hd] per device: batch over
    # data*fsdp=4, kv heads over tensor=2 (CACHE_AXES); no device holds the whole cache.
    fn = gen._compiled(cfg, mesh, DEFAULT_RULES, new_len=64, top_k=0, use_top_p=False)
    args = gen.prepare_prompts(PROMPTS, batch=4, length=64)
    with use_rules(mesh, DEFAULT_RULES):
        hlo = fn.lower(sharded, *args, np.ones(4, bool), jax.random.key(0), 1.0, 1.0, 0, 8, False,
                       np.full(4, -1, np.int32), 0).compile().as_text()
    hd = cfg.resolved_head_dim
    assert f"f32[{cfg.layers},1,128,1,{hd}]" in hlo and f"f32[{cfg.layers},4,128,2,{hd}]" not in hlo


def test_generate_cli(model, tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    hf, d, cfg, params = model
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins with spaces
    tok.save(str(d / "tokenizer.json"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": " ".join(f"w{t}" for t in p)}) for p in PROMPTS[1:]))
    rc = gen.generate_main(["--model", str(d), "--prompt", " ".join(f"w{t}" for t in PROMPTS[0]), "--prompts",
                            str(prompts), "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "64",
                            "--temperature", "0"])
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["num_tokens"] >= 1 for r in rows)
    greedy = gen.generate(params, cfg, PROMPTS, max_new_tokens=64, greedy=True, eos_ids=(2,))  # eos from d
    for b, r in enumerate(rows):
        n = int(greedy["lengths"][b])
        assert r["num_tokens"] == n and r["ended_with_eos"] == bool(greedy["ended_with_eos"][b])
        want = greedy["tokens"][b, :n - int(greedy["ended_with_eos"][b])]
        assert r["response"].split() == [f"w{t}" for t in want]
    assert gen.generate_main(["--model", str(d)]) == 2
