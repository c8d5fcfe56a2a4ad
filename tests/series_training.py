"""A tiny GPT-NeoX trained for real on the CPU, saved as the Hugging Face Trainer saves.

The task has learnable structure that needs attention: each sequence is ``COPY`` random
tokens, a separator, and the same tokens again; the loss is on the copy. Checkpoints go to
``checkpoint-<step>/`` folders (``config.json``, ``model.safetensors``, ``trainer_state.json``
and ``optimizer.pt``, as the Trainer writes them), step 0 (before training) included.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COPY = 8
VOCAB = 32
TINY_NEOX = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, vocab_size=VOCAB + 1, max_position_embeddings=32,
                 rotary_pct=0.5)


def copy_batch(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``: ``x SEP x`` with labels -100 except on the copied half."""
    x = torch.randint(0, VOCAB, (size, COPY), generator=gen)
    sep = torch.full((size, 1), VOCAB)
    seq = torch.cat([x, sep, x], dim=1)
    labels = seq.clone()
    labels[:, :COPY + 1] = -100
    return seq, labels


def save_checkpoint(model, optimizer, out: Path, step: int, loss: float) -> Path:
    folder = out / f"checkpoint-{step}"
    model.save_pretrained(folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps(
        {"global_step": step, "log_history": [{"step": step, "loss": loss}]}))
    return folder


def train_series(out: Path, steps: int = 240, save_every: int = 80, seed: int = 0,
                 batch: int = 32, lr: float = 3e-3) -> list[float]:
    """Train the tiny GPT-NeoX for ``steps`` AdamW steps, saving every ``save_every`` steps
    and at step 0 into ``out/checkpoint-<step>/``; returns the loss at each saved step."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a d = 64 model: one thread is fastest, and leaves the other core
    try:
        return _train(out, steps, save_every, seed, batch, lr)
    finally:
        torch.set_num_threads(threads)


def _train(out, steps, save_every, seed, batch, lr) -> list[float]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**TINY_NEOX))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, loss = [], float("nan")
    save_checkpoint(model, optimizer, out, 0, loss)
    for step in range(1, steps + 1):
        inputs, labels = copy_batch(gen, batch)
        result = model(input_ids=inputs, labels=labels)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        loss = float(result.loss.detach())
        if step % save_every == 0:
            save_checkpoint(model, optimizer, out, step, loss)
            losses.append(loss)
    return losses
