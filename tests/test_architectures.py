"""Every supported architecture, built by transformers' own config class: the adapter's weights
reproduce what the transformers modules compute (q/k/v projections before RoPE, FFN input,
attention and FFN outputs); each head's kernel pairs it with the key head transformers'
``repeat_kv`` gives it; folded norms reproduce the normed stream of a forward pass; and the
whole workflow runs on each."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import assert_ok, naive_kernel_svd, run_snakemake
from transformers.models.llama.modeling_llama import repeat_kv

from weight_geometry.checkpoint import open_checkpoint
from weight_geometry.errors import UserError
from weight_geometry.kernels import head_subspaces, ov_circuits

COMMON = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              vocab_size=64)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=2),
    "qwen2": lambda: T.Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen3": lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=16),
    "gemma": lambda: T.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=20),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16),
    # Gemma3ForConditionalGeneration: its text tower, beside a one-layer vision tower.
    "gemma3": lambda: T.Gemma3Config(
        text_config=T.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4),
    "olmo2": lambda: T.Olmo2Config(**COMMON, num_key_value_heads=2),
    "phi3": lambda: T.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(n_embd=48, n_layer=3, n_head=4, vocab_size=64, n_positions=16),
    "gpt_neox": lambda: T.GPTNeoXConfig(**COMMON),
    # SmolLM3: NoPE every second layer here (layer 1), so a 3-layer model has one.
    "smollm3": lambda: T.SmolLM3Config(**COMMON, num_key_value_heads=2, pad_token_id=0,
                                       no_rope_layer_interval=2),
    "olmo3": lambda: T.Olmo3Config(**COMMON, num_key_value_heads=2, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"]),
    # Llama 4's attention and dense FFN (under feed_forward.); its experts: test_new_families.
    "llama4_text": lambda: T.Llama4TextConfig(**COMMON, num_key_value_heads=2, head_dim=16,
                                              intermediate_size_mlp=80, moe_layers=[],
                                              attention_chunk_size=8),
}
#: Models without a gated FFN (their FFN input is W_up), by their workflow names.
NON_GATED = ("gpt2", "gpt-neox")
#: QK-norm gains, per head (Qwen3, Gemma 3: ``1 + w``), or over the whole projection (OLMo 2).
QK_NORM_OFFSET = {"qwen3": 0.0, "gemma3_text": 1.0, "gemma3": 1.0}


def build(arch: str, path):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():  # non-trivial biases and norm gains, so leaving them out is visible
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(path)
    return model


def decoder_layer(model, arch: str, layer: int) -> torch.nn.Module:
    if arch == "gpt2":
        return model.transformer.h[layer]
    if arch == "gpt_neox":
        return model.gpt_neox.layers[layer]
    if arch == "gemma3":
        return model.model.language_model.layers[layer]
    return model.model.layers[layer]


def linear_output(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W^T`` as a transformers projection module (``nn.Linear``, GPT-2's ``Conv1D``)
    computes it, its bias removed."""
    out = module(x)
    return out - module.bias if getattr(module, "bias", None) is not None else out


def module_projections(model, arch: str, layer: int, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-weight outputs ``x W^T`` of the projections reading the residual stream ``x``
    (``(n, d)``) as the transformers modules compute them, biases removed, split the way each
    attention's forward splits them (``(n, heads * d_head)``)."""
    def lin(module, inp=x):
        return linear_output(module, inp)

    cfg = model.config
    blk = decoder_layer(model, arch, layer)
    if arch == "gpt2":
        q, k, v = lin(blk.attn.c_attn).split(cfg.n_embd, dim=-1)
        return {"W_Q": q, "W_K": k, "W_V": v, "W_up": lin(blk.mlp.c_fc)}
    if arch == "gpt_neox":
        h = cfg.num_attention_heads
        qkv = lin(blk.attention.query_key_value).view(len(x), h, -1)
        q, k, v = (t.reshape(len(x), -1) for t in qkv.chunk(3, dim=-1))
        return {"W_Q": q, "W_K": k, "W_V": v, "W_up": lin(blk.mlp.dense_h_to_4h)}
    if arch == "phi3":
        qkv = lin(blk.self_attn.qkv_proj)
        nq = cfg.num_attention_heads * blk.self_attn.head_dim
        nkv = cfg.num_key_value_heads * blk.self_attn.head_dim
        gate, up = lin(blk.mlp.gate_up_proj).chunk(2, dim=-1)
        return {"W_Q": qkv[:, :nq], "W_K": qkv[:, nq:nq + nkv], "W_V": qkv[:, nq + nkv:],
                "W_gate": gate, "W_up": up}
    att, mlp = blk.self_attn, getattr(blk, "mlp", None) or blk.feed_forward   # Llama 4
    return {"W_Q": lin(att.q_proj), "W_K": lin(att.k_proj), "W_V": lin(att.v_proj),
            "W_gate": lin(mlp.gate_proj), "W_up": lin(mlp.up_proj)}


#: The projections writing to the residual stream, under the decoder layer: W_O, W_down.
OUTPUT_PROJECTIONS = {"gpt2": ("attn.c_proj", "mlp.c_proj"),
                      "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
                      "llama4_text": ("self_attn.o_proj", "feed_forward.down_proj")}
OUTPUT_PROJECTIONS_DEFAULT = ("self_attn.o_proj", "mlp.down_proj")


def output_projections(model, arch: str, layer: int, heads_out: torch.Tensor,
                       ffn_hidden: torch.Tensor) -> dict[str, np.ndarray]:
    """``z W^T`` of W_O (``z = heads_out``, the heads' concatenated outputs, ``(n, heads *
    d_head)``) and W_down (``z = ffn_hidden``, ``(n, d_ff)``) as the transformers modules
    compute them, biases removed."""
    blk = decoder_layer(model, arch, layer)
    w_o, w_down = OUTPUT_PROJECTIONS.get(arch, OUTPUT_PROJECTIONS_DEFAULT)
    return {"W_O": linear_output(blk.get_submodule(w_o), heads_out),
            "W_down": linear_output(blk.get_submodule(w_down), ffn_hidden)}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_adapter_reproduces_transformers_modules(tmp_path, arch):
    model = build(arch, tmp_path / arch)
    ckpt = open_checkpoint(str(tmp_path / arch))
    cfg = model.config.get_text_config()
    assert ckpt.architecture == arch
    dims = ckpt.dims
    assert dims.n_layers == 3 and dims.d_model == 48
    assert dims.d_head == (getattr(cfg, "head_dim", None) or 48 // 4)
    inputs = {"W_O": torch.randn(7, dims.n_heads * dims.d_head),
              "W_down": torch.randn(7, dims.d_ff)}
    x = torch.randn(7, 48)                                  # the residual stream: the rest
    for layer in range(3):
        ours = ckpt.read_layer(layer)
        with torch.no_grad():
            ref = {**module_projections(model, arch, layer, x),
                   **output_projections(model, arch, layer, inputs["W_O"], inputs["W_down"])}
        assert set(ref) == set(ours) == set(ckpt.weight_types), arch     # every weight compared
        for wt, out in ref.items():
            got = inputs.get(wt, x).numpy() @ ours[wt].T
            np.testing.assert_allclose(got, out.numpy(), atol=1e-5, err_msg=f"{arch} {wt}")
        for wt, w in ours.items():
            assert w.shape == dims.weight_shape(wt), (arch, wt)
    assert ckpt.adapter.ffn_input == ("W_up" if arch in ("gpt2", "gpt_neox") else "W_gate")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_base_model_checkpoint_reads_as_its_causal_lm(tmp_path, arch):
    """A checkpoint saved from the base model (``GPT2Model``, ``LlamaModel``, ...; as the
    official GPT-2 file) has no ``transformer.``/``model.`` prefix: its weights, norm gains
    included, are those of the ForCausalLM model with the same state."""
    if arch == "gemma3":
        pytest.skip("Gemma3ForConditionalGeneration's base model is multimodal, not a decoder")
    causal = build(arch, tmp_path / "causal")
    base = causal.base_model                                    # GPT2Model, LlamaModel, ...
    if arch == "llama4_text":   # its base_model_prefix names the multimodal model's tower
        base = causal.model
    assert "LMHead" not in type(base).__name__ and "ForCausalLM" not in type(base).__name__
    base.save_pretrained(tmp_path / "base")
    prefixed = open_checkpoint(str(tmp_path / "causal")).adapter.tensor_name("W_Q", 0)
    assert prefixed not in base.state_dict()                    # model.layers.0.self_attn...
    assert prefixed.partition(".")[2] in base.state_dict()      # layers.0.self_attn...
    for fold in (False, True):
        ours = open_checkpoint(str(tmp_path / "base"), fold_norms=fold)
        ref = open_checkpoint(str(tmp_path / "causal"), fold_norms=fold)
        assert ours.dims == ref.dims
        for layer in range(ref.dims.n_layers):
            got, expected = ours.read_layer(layer, fold), ref.read_layer(layer, fold)
            assert got.keys() == expected.keys()
            for wt, w in expected.items():
                np.testing.assert_array_equal(got[wt], w, err_msg=f"{arch} {wt} {layer}")


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_head_kernels_pair_heads_as_transformers_does(tmp_path, arch):
    """Each head's subspaces and singular values are those of its kernel as transformers
    computes it: the pre-RoPE scores ``q_i . k`` of basis inputs (``x = I``), where query head
    i meets the key head that transformers' own ``repeat_kv`` gives it (GQA, MQA, MHA)."""
    model = build(arch, tmp_path / arch)
    ckpt = open_checkpoint(str(tmp_path / arch))
    h, n_kv, dh, d = (ckpt.dims.n_heads, ckpt.dims.n_kv_heads, ckpt.dims.d_head,
                      ckpt.dims.d_model)
    with torch.no_grad():
        proj = module_projections(model, arch, 1, torch.eye(d))
    q = proj["W_Q"].view(d, h, dh).transpose(0, 1)                        # (h, d, d_head)
    k = repeat_kv(proj["W_K"].view(1, d, n_kv, dh).transpose(1, 2), h // n_kv)[0]
    # As (h d_head, d) row blocks, one key block per query head: head i's kernel is
    # q_i k_i^T, the scores A_i of the naive reference.
    q_rows, k_rows = (t.transpose(1, 2).reshape(h * dh, d).double().numpy() for t in (q, k))
    ours = ckpt.read_layer(1)
    v, s = head_subspaces(torch.from_numpy(ours["W_Q"]).double(),
                          torch.from_numpy(ours["W_K"]).double(), h, n_kv, dh)
    for i in range(h):
        s_ref, vt_ref = naive_kernel_svd(q_rows, k_rows, i, dh)
        np.testing.assert_allclose(s[i], s_ref[:dh], rtol=1e-5, err_msg=f"{arch} head {i}")
        overlap = np.square(v[i].numpy() @ vt_ref[:dh].T).sum()   # d_head for the same span
        assert overlap == pytest.approx(dh, rel=1e-6), (arch, i)



@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_ov_circuits_pair_heads_as_transformers_does(tmp_path, arch):
    """Each head's OV circuit W_O_i W_V_j, as kernels.ov_circuits gets it from the adapter's
    W_O and W_V, is the map transformers computes: head i's values (``repeat_kv`` of the
    value projection of basis inputs) through head i's slice of the output projection
    (basis vectors of its d_head coordinates), formed in float64."""
    model = build(arch, tmp_path / arch)
    ckpt = open_checkpoint(str(tmp_path / arch))
    h, n_kv, dh, d = (ckpt.dims.n_heads, ckpt.dims.n_kv_heads, ckpt.dims.d_head,
                      ckpt.dims.d_model)
    with torch.no_grad():
        values = module_projections(model, arch, 1, torch.eye(d))["W_V"]       # (d, n_kv dh)
        values = repeat_kv(values.view(1, d, n_kv, dh).transpose(1, 2), h // n_kv)[0]
        outputs = output_projections(model, arch, 1, torch.eye(h * dh),
                                     torch.zeros(1, ckpt.dims.d_ff))["W_O"]   # (h dh, d)
    ours = ckpt.read_layer(1)
    ov = ov_circuits(torch.from_numpy(ours["W_O"]), torch.from_numpy(ours["W_V"]), h, n_kv, dh,
                     torch.float64)
    for i in range(h):
        formed = (outputs[i * dh:(i + 1) * dh].T.double() @ values[i].T.double()).numpy()
        t_ref = np.linalg.svd(formed, compute_uv=False)
        np.testing.assert_allclose(ov.singular_values[i], t_ref[:dh], rtol=1e-5,
                                   err_msg=f"{arch} head {i}")
        rebuilt = ov.left[i].T @ torch.diag(ov.singular_values[i]) @ ov.right[i]
        np.testing.assert_allclose(rebuilt.numpy(), formed, atol=1e-5 * t_ref[0],
                                   err_msg=f"{arch} head {i}")


#: The projections a normed stream enters, under the decoder layer: attention's, the FFN's.
NORMED_INPUTS = {"gpt2": ("attn.c_attn", "mlp.c_fc"),
                 "gpt_neox": ("attention.query_key_value", "mlp.dense_h_to_4h"),
                 "phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj"),
                 "llama4_text": ("self_attn.q_proj", "feed_forward.gate_proj")}
NORMED_INPUTS_DEFAULT = ("self_attn.q_proj", "mlp.gate_proj")


def normed_stream(model, arch: str, layer: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """From a forward pass of the model, for the attention and FFN inputs of ``layer``:
    ``(x_hat, z)``, where ``z`` is what the projection received less its norm's bias, and
    ``x_hat`` the norm's input normalized without its gain. The norm is found by value: the
    one of the layer's norm modules whose output the projection received."""
    blk = decoder_layer(model, arch, layer)
    norms = {name: m for name, m in blk.named_modules() if "Norm" in type(m).__name__}
    seen, received, hooks = {}, {}, []
    for name, m in norms.items():
        hooks.append(m.register_forward_hook(
            lambda _m, inp, out, name=name: seen.__setitem__(name, (inp[0], out))))
    for role, path in zip(("attn", "ffn"), NORMED_INPUTS.get(arch, NORMED_INPUTS_DEFAULT),
                          strict=True):
        hooks.append(blk.get_submodule(path).register_forward_pre_hook(
            lambda _m, inp, role=role: received.__setitem__(role, inp[0])))
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 7)))
    for hook in hooks:
        hook.remove()
    out = {}
    for role, z in received.items():
        feeding = [n for n, (_, y) in seen.items() if y.shape == z.shape and torch.allclose(y, z)]
        assert len(feeding) == 1, (arch, role, feeding)
        norm, x = norms[feeding[0]], seen[feeding[0]][0].double()
        eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
        if isinstance(norm, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        bias = None if getattr(norm, "bias", None) is None else norm.bias.detach()
        out[role] = (x_hat[0], (z - bias if bias is not None else z)[0].double())
    return out


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_fold_norms_reproduces_the_normed_stream(tmp_path, arch):
    """With fold_norms, every projection reading a normed stream maps the normalized stream
    (without gain) to what the unfolded projection computes from the norm module's output in
    a forward pass of the model: ``W diag(g) x_hat = W z``, QK-norm gains on each head's rows
    (Qwen3, Gemma 3); W_O and W_down are left as they are."""
    if arch in ("olmo2", "olmo3"):
        pytest.skip("OLMo 2 and 3 have no norm before their sublayers: test_olmo_fold_norms")
    model = build(arch, tmp_path / arch)
    raw = open_checkpoint(str(tmp_path / arch)).read_layer(1)
    folded = open_checkpoint(str(tmp_path / arch), fold_norms=True).read_layer(1, True)
    stream = normed_stream(model, arch, 1)
    ffn_in = ("W_gate", "W_up") if "W_gate" in raw else ("W_up",)
    for wt, role in [("W_Q", "attn"), ("W_K", "attn"), ("W_V", "attn")] + [
            (wt, "ffn") for wt in ffn_in]:
        x_hat, z = stream[role]
        expected = z @ torch.from_numpy(raw[wt]).double().T
        if arch in QK_NORM_OFFSET and wt in ("W_Q", "W_K"):   # q/k_norm gains, per head
            qk_norm = decoder_layer(model, arch, 1).self_attn.get_submodule(
                "q_norm" if wt == "W_Q" else "k_norm")
            gain = qk_norm.weight.detach().double() + QK_NORM_OFFSET[arch]
            expected = (expected.view(7, -1, len(gain)) * gain).view(7, -1)
        got = x_hat @ torch.from_numpy(folded[wt]).double().T
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=f"{arch} {wt}")
    for wt in ("W_O", "W_down"):
        np.testing.assert_array_equal(folded[wt], raw[wt])


@pytest.mark.parametrize("arch", ["olmo2", "olmo3"])
def test_olmo_fold_norms(tmp_path, arch):
    """OLMo 2 and 3 normalize all of W_Q's outputs at once (and W_K's), and nothing before
    their sublayers: folded, ``diag(g_q) W_Q`` maps the raw stream to q_norm's output up to the
    per-token RMS of the raw projection (a positive scalar, the same for every head); every
    other weight is as stored."""
    model = build(arch, tmp_path / arch)
    raw = open_checkpoint(str(tmp_path / arch)).read_layer(1)
    folded = open_checkpoint(str(tmp_path / arch), fold_norms=True).read_layer(1, True)
    att = decoder_layer(model, arch, 1).self_attn
    x = torch.randn(7, 48, dtype=torch.float64)
    for wt, proj, norm in (("W_Q", att.q_proj, att.q_norm), ("W_K", att.k_proj, att.k_norm)):
        with torch.no_grad():
            expected = norm.double()(proj.double()(x))
        z = x @ torch.from_numpy(raw[wt]).double().T
        rms = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        got = (x @ torch.from_numpy(folded[wt]).double().T) * rms
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=wt)
        assert not np.array_equal(folded[wt], raw[wt])
    for wt in ("W_V", "W_O", "W_gate", "W_up", "W_down"):
        np.testing.assert_array_equal(folded[wt], raw[wt])


def test_gemma3_text_config_defaults(tmp_path):
    """Gemma 3's published config.json leaves out the head counts and head_dim: the reader
    takes what transformers' Gemma3TextConfig does, in text_config for the multimodal model."""
    import json as _json

    for arch in ("gemma3_text", "gemma3"):
        build(arch, tmp_path / arch)
        path = tmp_path / arch / "config.json"
        config = _json.loads(path.read_text())
        text = config.get("text_config", config)
        for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
            text.pop(key)
        path.write_text(_json.dumps(config))
        full = T.AutoConfig.from_pretrained(tmp_path / arch).get_text_config()
        assert (full.num_attention_heads, full.num_key_value_heads, full.head_dim) == (8, 4, 256)
        with pytest.raises(UserError) as info:   # the defaults contradict the tensors
            open_checkpoint(str(tmp_path / arch))
        assert "config implies (2048, 48)" in str(info.value), str(info.value)
    path.write_text(_json.dumps({**config, "text_config": None}))
    with pytest.raises(UserError) as info:
        open_checkpoint(str(tmp_path / "gemma3"))
    assert str(info.value) == (f"{path}: no text_config object (the text model's config,"
                               " needed for the model's dimensions)")


@pytest.mark.workflow
def test_workflow_runs_on_every_architecture(tmp_path):
    models = {}
    for arch in CONFIGS:
        build(arch, tmp_path / "ckpt" / arch)
        models[arch.replace("_", "-")] = {"source": str(tmp_path / "ckpt" / arch)}
    workdir = tmp_path / "run"
    # Every model through extraction and the per-k tables, the non-gated ones through their
    # report, all of them into the comparison. The figures, head matching and k-sweep of the
    # gated models (architecture-blind steps, run on Llama in test_workflow.py) are left out:
    # each is a Python process per model, and this run is among the slowest tests.
    per_model = ["model.json", "effective_ranks.csv", "k3/alignment.parquet",
                 "k3/similarity_head0.npy"]
    targets = [f"results/{name}/{path}" for name in models for path in per_model]
    targets += [f"results/{name}/k3/report.md" for name in NON_GATED]
    assert_ok(run_snakemake(workdir, *targets, "results/compare/k3/models.csv",
                            config={"models": models, "top_k": 3, "heads": {"sample": 2},
                                    "device": "cpu"}, timeout=900))
    for name in models:
        r = workdir / "results" / name
        meta = json.loads((r / "model.json").read_text())
        align = pd.read_parquet(r / "k3" / "alignment.parquet")
        assert align["alignment"].between(0, 1).all(), name
        ranks = pd.read_csv(r / "effective_ranks.csv")
        if name in NON_GATED:
            assert meta["ffn_input"] == "W_up" and set(align["ffn_input"]) == {"W_up"}
            assert "W_gate" not in set(ranks["weight_type"]) and len(ranks) == 3 * 6
            assert "FFN is not gated" in (r / "k3" / "report.md").read_text()
        else:
            assert len(ranks) == 3 * 7
        sims = np.load(r / "k3" / "similarity_head0.npy")
        assert np.allclose(sims, sims.T) and np.allclose(np.diag(sims), 1)
    # Models of different widths side by side.
    compared = pd.read_csv(workdir / "results/compare/k3/models.csv")
    assert sorted(set(compared["model"])) == sorted(models)
