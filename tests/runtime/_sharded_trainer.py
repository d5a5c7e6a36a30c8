"""One rank of a real FSDP2 trainer on gloo, pushing with WeightSync(delta=True) after each AdamW step.

    python -m tests.runtime._sharded_trainer --coordinator ADDR --rank R --world W --init-file F --workdir D

The model has the Hugging Face names and shapes of tests/faults/fleet.py's make_weights (fp32
master weights, a bf16 wire) and is sharded with fully_shard.
Per version: one training step (forward, backward, AdamW), then a push on every rank; version 1
is dense (no base yet), version 2 a delta against WeightSync's own base, version 3 a delta
against an explicit base (the DTensor state of version 2, cloned before the step). Rank 0
writes each version's full bf16 weights to WORKDIR/v{N}.safetensors (what every engine must
hold) and one JSON line per round to WORKDIR/rounds.jsonl, then waits for WORKDIR/checked-v{N}
(the test checks the engines' bytes in between, while they hold exactly that version).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

BUCKET_BYTES = 1 << 20


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name, out in (("q_proj", 512), ("k_proj", 128), ("v_proj", 128), ("o_proj", 512)):
            setattr(self.self_attn, name, nn.Linear(512, out, bias=False))
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(512, 1024, bias=False)
        self.mlp.up_proj = nn.Linear(512, 1024, bias=False)
        self.mlp.down_proj = nn.Linear(1024, 512, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        h = h + a.o_proj(a.q_proj(h)) + (a.k_proj(h) * a.v_proj(h)).mean(-1, keepdim=True)
        m = self.mlp
        return h + m.down_proj(nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))


class _Model(nn.Module):
    """A decoder-shaped toy whose state_dict names and shapes are make_weights'."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(1024, 512)
        self.model.layers = nn.ModuleList(_Layer() for _ in range(4))
        self.model.norm = nn.RMSNorm(512)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            h = layer(h)
        h = self.model.norm(h)
        logits = h @ self.model.embed_tokens.weight.t()
        # The next token, at random: a loss with real gradients (the same token is trivially predicted).
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 1024), tokens[:, 1:].reshape(-1))


def _wait_for(path: Path, timeout_s: float = 300.0) -> None:
    """Waits until the test has checked the engines of this round (it creates `path`); the other rank waits in the next gather."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not created within {timeout_s:g} s")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--coordinator", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init-file", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--lr", type=float, default=3e-6)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the ranks share two cores with the daemons
    torch.distributed.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=args.world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from weightsync.runtime.trainer import WeightSync

    workdir = Path(args.workdir)
    torch.manual_seed(0)
    model = _Model()  # torch's own init: the daemons' random checkpoint would overflow this toy's forward
    mesh = init_device_mesh("cpu", (args.world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    with WeightSync(args.coordinator, dtype="bfloat16", delta=True, bucket_size_bytes=BUCKET_BYTES, collective_timeout_s=60.0,
                    deadline_s=120.0, min_daemons=2) as sync:
        # A push refused on rank 0 (a base without its version) must raise on every rank, not
        # leave the others waiting for a plan.
        try:
            sync.push(model, version=1, base=model.state_dict())
        except ValueError as e:
            if args.rank == 0:
                (workdir / "refused.txt").write_text(str(e))
        else:
            raise AssertionError("push(base=...) without base_version was not refused")
        previous = None
        for version in (1, 2, 3):
            tokens = torch.randint(0, 1024, (2, 16), generator=gen)
            model(tokens).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            state = model.state_dict()
            # Every rank gathers (a collective); rank 0 writes what the engines must hold.
            expected = {k: v.full_tensor().to(torch.bfloat16) for k, v in state.items()}
            if args.rank == 0:
                save_file(expected, workdir / f"v{version}.safetensors")
            if version == 3:
                report = sync.push(model, version=version, base=previous, base_version=2, raise_on_failure=False)
            else:
                report = sync.push(model, version=version, raise_on_failure=False)
            previous = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if args.rank == 0:
                line = {
                    "version": version,
                    "state": report.state,
                    "reason": report.reason,
                    "daemons": {r.daemon_id: [r.status, r.encoding, r.bytes_received] for r in report.results},
                }
                with open(workdir / "rounds.jsonl", "a") as f:
                    f.write(json.dumps(line) + "\n")
                _wait_for(workdir / f"checked-v{version}")
            else:
                assert report is None, report
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
