"""A realistic change stream: how many bf16 wire elements change per optimizer step, and what each
delta encoding would put on the wire.

    python bench/delta_change_stream.py --steps 6 --json bench/results_delta_change_stream_cpu.json

A small Qwen2 (hidden 512, 4 layers, 8 heads, 2 KV heads, intermediate 1376, vocab 4096, random
init std 0.02, fp32 master weights) is trained with AdamW on random tokens, once per learning
rate (1e-6, 3e-6, 1e-5, the same seed each). After every step the weights are cast to the bf16
wire dtype and encoded against the previous step's bf16 weights (the version the fleet would
hold): per step the changed fraction and the wire bytes of each encoding, forced for every
tensor, and of the per-tensor choice, as fractions of the dense bytes. Every chosen delta is
applied to the base and checked to give the new bf16 weights bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import torch

from weightsync.dataplane.delta import Encoding, apply_many, encode_many

_LRS = (1e-6, 3e-6, 1e-5)


def _model(seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1376,
        vocab_size=4096,
        max_position_embeddings=512,
        initializer_range=0.02,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def _wire(model) -> list[torch.Tensor]:
    return [p.detach().to(torch.bfloat16).contiguous() for p in model.parameters()]


def _run_lr(lr: float, steps: int, batch: int, seq: int, seed: int) -> list[dict]:
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    base = _wire(model)
    dense = sum(t.numel() * t.element_size() for t in base)
    numel = sum(t.numel() for t in base)
    rows = []
    for step in range(1, steps + 1):
        tokens = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t0
        new = _wire(model)
        chosen = encode_many(base, new)
        changed = sum(d.num_changed for d in chosen)
        wire = {e.value: sum(d.nbytes for d in encode_many(base, new, allowed=[e])) / dense for e in Encoding}
        counts: dict[str, int] = {}
        for d in chosen:
            counts[d.encoding.value] = counts.get(d.encoding.value, 0) + 1
        check = [b.clone() for b in base]
        apply_many(check, chosen)
        exact = all(torch.equal(c.view(torch.int16), n.view(torch.int16)) for c, n in zip(check, new))
        row = {
            "lr": lr,
            "step": step,
            "loss": float(loss.detach()),
            "changed_fraction": changed / numel,
            "wire_fraction_chosen": sum(d.nbytes for d in chosen) / dense,
            "wire_fraction_forced": wire,
            "tensors_by_encoding": counts,
            "exact": exact,
            "train_step_s": train_s,
        }
        rows.append(row)
        print(
            f"lr {lr:.0e} step {step}: changed {row['changed_fraction']:.4f}  chosen {row['wire_fraction_chosen']:.4f}  "
            + "  ".join(f"{k} {v:.4f}" for k, v in wire.items())
            + f"  {counts}  exact {exact}",
            flush=True,
        )
        base = new
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lrs", default=",".join(str(lr) for lr in _LRS), help="learning rates, comma-separated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.command = "python bench/delta_change_stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows: list[dict] = []
    for lr in (float(v) for v in args.lrs.split(",")):
        rows += _run_lr(lr, args.steps, args.batch, args.seq, args.seed)
        # Written after every learning rate, so that a run cut short keeps what it measured.
        _write(args, rows, time.perf_counter() - t0)
    return 0 if all(r["exact"] for r in rows) else 1


def _write(args, rows: list[dict], wall_s: float) -> None:
    model = _model(args.seed)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "model": "Qwen2 hidden 512, 4 layers, 8 heads, 2 KV heads, intermediate 1376, vocab 4096, tied, init std 0.02",
        "parameters": sum(p.numel() for p in model.parameters()),
        "optimizer": "AdamW (torch defaults: betas 0.9/0.999, weight decay 0.01), fp32 master weights, bf16 wire",
        "batch": [args.batch, args.seq],
        "rows": rows,
        "learning_rates_done": sorted({r["lr"] for r in rows}),
        "all_exact": all(r["exact"] for r in rows),
        "wall_s": wall_s,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    raise SystemExit(main())
