"""Export a MiniLM adapter saved by jaxlora to Hugging Face PEFT, and check it there.

    python -m examples.export_peft runs/sentiment/adapter runs/sentiment/adapter-peft

Loads the adapter (``jaxlora.load``) onto the offline MiniLM weights, writes it with
``jaxlora.save_peft`` (torch module names from `examples.minilm.torch_module_name`)
and, where torch, transformers and peft are installed, runs it with
``peft.PeftModel.from_pretrained`` on transformers' ``BertModel``, printing the
largest difference from jaxlora's hidden states next to the adapter's own effect.
The classifier head of the sentiment job is not part of a PEFT LoRA adapter.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import numpy as np

import jaxlora
from examples import minilm

TEXTS = [
    "A gripping, beautifully acted film.",
    "Dull, overlong and predictable.",
    "It is neither good nor bad, just there.",
]


def export(adapter: str, out: str) -> tuple[str, dict]:
    """Writes the PEFT adapter; returns its path and the adapted MiniLM params."""
    model, variables = minilm.load_minilm()
    params = jaxlora.load(adapter, variables)
    names = lambda path, layer: minilm.torch_module_name(path)  # noqa: E731
    return jaxlora.save_peft(out, params, names, overwrite=True), params


def compare(path: str, params: dict) -> tuple[float, float]:
    """``(max |PEFT − jaxlora|, max |jaxlora − base|)`` over real tokens."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch
    import transformers

    model, _ = minilm.load_minilm()
    batch = minilm.MiniLMTokenizer(32)(TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    bert = transformers.BertModel.from_pretrained(minilm.model_dir()).eval()
    peft_model = peft.PeftModel.from_pretrained(bert, path).eval()
    with torch.no_grad():
        theirs = peft_model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
        ).last_hidden_state.numpy()
    ours = np.asarray(jaxlora.lora_apply(model.apply)(params, ids, mask))
    base = np.asarray(model.apply(jaxlora.base(params), ids, mask))
    real = mask.astype(bool)
    gap = lambda u, v: float(np.abs(u - v)[real].max())  # noqa: E731
    return gap(theirs, ours), gap(ours, base)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a directory written by jaxlora.save")
    parser.add_argument("out", help="the PEFT adapter directory to write")
    args = parser.parse_args()
    path, params = export(args.adapter, args.out)
    print(f"PEFT adapter: {path} ({len(jaxlora.adapters(params))} targets)")
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
        print("torch, transformers or peft not installed: not checked in PyTorch")
        return
    diff, effect = compare(path, params)
    print(
        f"PEFT on transformers' BertModel vs jaxlora: max |diff| {diff:.2e} "
        f"(the adapter moves hidden states by up to {effect:.2e})"
    )


if __name__ == "__main__":
    main()
