"""Memory of one whole optimisation step of lerobot's real pi0-fast (or pi0, pi0.5), counted without a GPU.

    python benchmarks/memory.py [--policy pi0_fast|pi0|pi05] [--dtype float32|bfloat16] [--batch_size 8]
                                [--cameras 1] [--gradient_checkpointing] [--lora_rank R] [--shards N[,N...]]
                                [--json PATH]

The model is lerobot's own PI0FastPolicy at its real configuration (PaliGemma gemma_2b, SigLIP so400m
at 224 px: 256 image tokens per camera, vocabulary 257152; `--model wide|tiny` for smaller ones),
built on the meta device and materialised with `to_empty(device="cpu")` inside torch's
`FakeTensorMode`: fake tensors carry shapes, dtypes and storages but allocate no memory, so a step
of the 3.45e9-parameter model runs here in seconds. `--policy pi0|pi05` measures lerobot's PI0Policy /
PI05Policy at their real configuration instead (PaliGemma gemma_2b + the gemma_300m action expert,
chunk 50, prompt 48 / 200 tokens; `--model tiny`: the offline kit's toy type; no `wide`). The policy
types and their configs come from craft_ext's policy registry (`craft_ext.policies.registry`). One
whole step of the project's real step code (`craft_ext.engine.step.CraftStep` with the policy's
adapter, `GradBuffers`, the surgery, lerobot's AdamW preset and scheduler; the same objects
`python -m craft_ext.train` builds) is traced, and a dispatch mode counts every tensor storage it
allocates and frees:

  parameters    the policy's weights and buffers
  task grad T   the flat task-gradient storage (what the optimiser steps on): lazy, its pieces appear as
                the task backward reaches them and are freed after the optimiser step
  retain grad R the flat retention-gradient storage (CRaFT only; plain runs have none): lazy, from the
                anchor backward until the surgery has merged it into T
  optimizer     AdamW's exp_avg / exp_avg_sq / step, alive across steps
  inputs        the task batch and the anchor batch
  activations   tensors autograd saved for the backward (marked by a saved-tensors hook)
  temporaries   everything else alive at that moment (the backward's gradients before they are
                accumulated into T or R, the optimiser's scratch, logits, casts, ...)

Each column is taken at the step's peak (the largest total of live storages). The second step is the
one measured (the first creates the optimiser state). The stand-in for a host read of a device value
(`.item()`, `bool(t)`, `.tolist()`; fake tensors have no values) is 0 / True, which keeps the step
finite and applied; the number of such reads per step is reported, since on a GPU each one is a
host sync.

Runs, side by side in one process: `lerobot` (lerobot-train's own `update_policy`: the baseline users
run today; its T column is its `param.grad` tensors, made by the backward and dropped by
`zero_grad`), `plain` (the CRaFT step with `--craft.enable=false`: no R), `craft` (K = 1, `pooled`
anchors), `craft_tokens` (K = 1, `tokens` anchors), `craft_two_pass` (K = 1, `pooled` anchors,
`--craft.two_pass_retention`: R computed twice and never stored). The rows also say how large T and R get over the
whole step and in which phases they live (`task_grad_max_gib`, `task_grad_phases`, ...).

`--lora_rank R` wraps the policy in LoRA adapters of rank R on every linear layer of the language
model(s) and the vision tower (`_policies.LORA_TARGETS`), through the trainer's own `--peft.*` path
(`craft_ext.baselines.peft.apply_peft`, i.e. lerobot's `wrap_with_peft`): the base weights are frozen,
T, R and the optimizer state are the adapters' size, and every run (lerobot's too) trains the adapters.

What the count does not see: the CUDA caching allocator's rounding and fragmentation, cuBLAS/cuDNN
workspaces and the CUDA context (~0.5-1 GiB); compare with `torch.cuda.max_memory_allocated` on a GPU
(`benchmarks/train_step.py --model full` reports it). Attention is SDPA's CPU flash kernel, which keeps
for the backward what CUDA's flash / memory-efficient kernels keep (output and log-sum-exp). AdamW
runs its `foreach` path by default, as torch picks it for CUDA tensors (`--optimizer`).

`--shards N` (or a list) also reports the per-GPU figure when parameters, T, R, optimizer state and the
optimiser's model-sized scratch are divided N ways (FSDP2); FSDP's per-layer all-gather buffers are
not modelled. See docs/architecture.md, "Memory".
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import machine_info, write_json
from _memory_report import checks, markdown_table, print_table
from _policies import LORA_TARGETS, MODELS, ModelSpec, build_policy, make_tokenizers
from _step import Phases, lerobot_update, make_accelerator, make_optimizer, make_step
from _storage_counter import CATEGORIES, StorageCounter
from _synthetic import synthetic_anchor_batch, synthetic_manifest, task_batch
from torch._subclasses.fake_tensor import FakeTensorMode

from craft_ext.policies.registry import POLICIES

GIB = 2**30
RUNS = ("lerobot", "plain", "craft", "craft_tokens", "craft_two_pass")


def measure(args, run: str, tokenizers, accelerator) -> dict:
    """Trace two steps of `run` on fake tensors; returns the second step's row."""
    from craft_ext.policies import make_adapter

    spec = ModelSpec(args.model, args.depth, args.vision_depth, args.policy)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    t0 = time.perf_counter()
    policy = build_policy(spec, cameras=args.cameras, dtype=args.dtype, tokenizers=tokenizers, fake=fake,
                          gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank)
    counter = StorageCounter(shards=args.shards)
    phases = Phases(counter.on_mark)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with fake, counter, torch.autograd.graph.saved_tensors_hooks(counter.saved, lambda t: t):
        counter.label(list(policy.parameters()) + list(policy.buffers()), "parameters")
        params = sum(p.numel() for p in policy.parameters())
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        trainable_tensors = sum(1 for p in policy.parameters() if p.requires_grad)
        adapter = make_adapter(policy)
        optimizer, scheduler = make_optimizer(policy, 1000, args.optimizer)
        batch = task_batch(policy, args.batch_size)
        counter.label(batch.values(), "inputs")
        manifest = anchors = None
        if run.startswith("craft"):
            pooling = "tokens" if run == "craft_tokens" else "pooled"
            manifest = synthetic_manifest(adapter, layers=args.layers, pooling=pooling, rows=args.anchor_batch_size)
            anchors = synthetic_anchor_batch(manifest, args.anchor_batch_size)
            counter.label([*anchors.inputs.values(), anchors.hidden, anchors.mask], "inputs")
        step = None
        if run == "lerobot":  # its param.grad tensors are made by the backward: count them as T
            for p in policy.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: counter.label([p.grad], "task_grad"))
            optimizer.register_step_pre_hook(lambda *_: phases.mark("optimizer"))
        else:
            step = make_step(policy, phases.adapter(adapter), optimizer, scheduler, phases.accelerator(accelerator),
                             manifest, two_pass=run == "craft_two_pass")
            _label_storage(counter, step.bufs.task, "task_grad")
            if step.bufs.retain is not None:
                _label_storage(counter, step.bufs.retain, "retain_grad")
        for i in range(2):
            if i == 1:
                counter.label([v for state in optimizer.state.values() for v in state.values()], "optimizer")
                counter.host_reads.clear()
                counter.reset_peak()
            if step is None:
                phases.mark("task_forward")
                lerobot_update(policy, batch, optimizer, scheduler, phases.accelerator(accelerator))
            else:
                phases.mark("zero_grad")
                output = step.compute(batch, anchors, 1.0, epsilon=0.05 if anchors is not None else None)
                phases.mark("host_sync")
                host = output.read()
                phases.mark("optimizer")
                step.finish(output, host)
            phases.mark("setup")
    trace_s = time.perf_counter() - t0
    elt = _bytes_per_element(policy)
    grad_bytes = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    row = _row(run, counter, grad_bytes)
    row.update(prefix_tokens=adapter.num_image_tokens + policy.config.tokenizer_max_length,
               action_tokens=getattr(policy.config, "max_action_tokens", policy.config.chunk_size),
               parameters_count=params, trainable_elements=trainable, trainable_tensors=trainable_tensors,
               bytes_per_trainable_element=elt, build_s=round(build_s, 2), trace_s=round(trace_s, 2),
               host_reads_per_step=dict(counter.host_reads))
    return row


def _label_storage(counter: StorageCounter, storage, category: str) -> None:
    """Count a gradient storage's pieces as `category`: those allocated now, and (a lazy storage's)
    each later one from its allocation on."""
    counter.label(storage.allocated_pieces(), category)
    storage.allocation_context = lambda: counter.allocating(category)


def _bytes_per_element(policy) -> float:
    params = [p for p in policy.parameters() if p.requires_grad]
    return sum(p.element_size() * p.numel() for p in params) / sum(p.numel() for p in params)


def _row(run: str, counter: StorageCounter, grad_bytes: int) -> dict:
    at = counter.peak_at
    task_pass = max(counter.transient_peak[p] for p in ("task_forward", "task_backward"))
    anchor_pass = max([counter.transient_peak[p] for p in ("anchor_forward", "anchor_backward")], default=0)
    row = {
        "name": run,
        "peak_gib": counter.peak / GIB,
        "peak_phase": at["phase"],
        **{f"{c}_gib": at[c] / GIB for c in CATEGORIES},
        "grad_buffer_gib": grad_bytes / GIB,
        "task_pass_transient_peak_gib": task_pass / GIB,
        "anchor_pass_transient_peak_gib": anchor_pass / GIB if run.startswith("craft") else None,
        "transient_before_anchor_forward_gib": (counter.transient_at_mark.get("anchor_forward", 0) / GIB
                                                if run.startswith("craft") else None),
        # the gradient storages over the whole step, not only at the peak: how large, and when they live
        "task_grad_max_gib": counter.category_peak["task_grad"] / GIB,
        "retain_grad_max_gib": counter.category_peak["retain_grad"] / GIB,
        "task_grad_phases": list(counter.live_in["task_grad"]),
        "retain_grad_phases": list(counter.live_in["retain_grad"]),
        "transient_peak_by_phase_gib": {p: v / GIB for p, v in counter.transient_peak.items()},
    }
    if counter.shards:
        row["sharded_peak_gib"] = {str(n): v / GIB for n, v in counter.sharded_peak.items()}
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", choices=tuple(POLICIES), default="pi0_fast", help="lerobot policy (default: %(default)s)")
    p.add_argument("--model", choices=MODELS, default="full")
    p.add_argument("--depth", type=int, default=2, help="language layers of --model wide")
    p.add_argument("--vision_depth", type=int, default=2, help="SigLIP layers of --model wide")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="lerobot's --policy.dtype (bfloat16 keeps the vision path and norms in float32, autocast bf16)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--anchor_batch_size", type=int, default=8)
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--layers", default="default", help="anchored layers (default: the cache builder's, per policy)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="train LoRA adapters of this rank (lerobot's --peft.*) on every linear layer of the language "
                        "model(s) and the vision tower instead of the whole model (default 0: full fine-tuning)")
    p.add_argument("--shards", default="", help="also report the per-GPU peak with FSDP2 over N GPUs (N or N,N)")
    p.add_argument("--optimizer", choices=["foreach", "fused", "for-loop"], default="foreach",
                   help="AdamW implementation; foreach is torch's default for CUDA tensors")
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)} (default: all; pi0 / pi0.5: all but lerobot)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    args = p.parse_args(argv)
    spec = ModelSpec(args.model, args.depth, args.vision_depth, args.policy)
    if args.runs is None:
        args.runs = ",".join(r for r in RUNS if not spec.flow or r != "lerobot")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        p.error(f"--runs: unknown {bad}; choose from {','.join(RUNS)}")
    try:
        args.shards = tuple(int(x) for x in args.shards.split(",") if x.strip())
    except ValueError:
        p.error(f"--shards must be integers like 8 or 2,4,8, got {args.shards!r}")
    if spec.flow and args.model == "wide":
        p.error("--model wide is pi0-fast's; for --policy pi0 or pi05 use full or tiny")
    if spec.flow and "lerobot" in runs:
        p.error("--runs lerobot: lerobot's pi0 / pi0.5 forward converts its loss to numpy, which fake tensors cannot; "
                "compare with the plain run")
    if any(n < 2 for n in args.shards):
        p.error("--shards: each N must be >= 2")
    for name in ("batch_size", "anchor_batch_size", "cameras", "depth", "vision_depth"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.lora_rank < 0:
        p.error("--lora_rank must be >= 0 (0: full fine-tuning)")
    from craft_ext.build_anchor_cache import parse_layers

    try:
        args.layers = parse_layers(args.layers)
    except ValueError as exc:
        p.error(str(exc))

    from craft_ext.utils.cli_logging import quiet_video_backend_warning

    quiet_video_backend_warning()
    if spec.flow:  # the Beta distribution of flow-matching times checks its arguments' values: fake tensors have none
        torch.distributions.Distribution.set_default_validate_args(False)
    with tempfile.TemporaryDirectory(prefix="craft-memory-") as tmp:
        tokenizers = make_tokenizers(Path(tmp), spec)
        accelerator = make_accelerator(spec.config(device="cpu", dtype=args.dtype))
        rows = []
        for run in runs:
            rows.append(measure(args, run, tokenizers, accelerator))
            print(f"[{run}: built in {rows[-1]['build_s']:.1f} s, two steps traced in {rows[-1]['trace_s']:.1f} s]",
                  file=sys.stderr)
    first = rows[0]
    report = {
        "config": {
            "policy": args.policy, "model": args.model, "model_description": spec.describe(), "dtype": args.dtype,
            "batch_size": args.batch_size, "anchor_batch_size": args.anchor_batch_size, "cameras": args.cameras,
            "layers": "default" if args.layers is None else args.layers,
            "gradient_checkpointing": args.gradient_checkpointing, "shards": list(args.shards),
            "lora_rank": args.lora_rank, "lora_targets": LORA_TARGETS if args.lora_rank else None,
            "optimizer": args.optimizer, "parameters": first["parameters_count"],
            "trainable_elements": first["trainable_elements"], "trainable_tensors": first["trainable_tensors"],
            "bytes_per_trainable_element": first["bytes_per_trainable_element"],
            "prefix_tokens": first["prefix_tokens"], "action_tokens": first["action_tokens"],
            **machine_info("cpu"),
        },
        "runs": rows,
        "targets": {},
    }
    report["checks"] = checks(report)
    print_table(report)
    if args.markdown:
        print(markdown_table(report))
    if args.json:
        write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
