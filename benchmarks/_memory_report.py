"""memory.py's report: the table on the terminal, the Markdown table for RESULTS.md, and the checks."""

from __future__ import annotations

from _harness import markdown_table as table

COLUMNS = (("parameters", "params"), ("task_grad", "T"), ("retain_grad", "R"), ("optimizer", "optim"),
           ("inputs", "inputs"), ("activations", "activ."), ("temporaries", "temp."))


def print_table(report: dict) -> None:
    """The report as a fixed-width table (MiB when every peak is under 1 GiB), then the checks' lines."""
    c = report["config"]
    lora = f"; LoRA rank {c['lora_rank']} on the language model(s) and vision tower" if c.get("lora_rank") else ""
    print(f"\n{c['model_description']}{lora}")
    print(f"{c['parameters'] / 1e9:.3f}e9 parameters, {c['trainable_elements'] / 1e9:.3f}e9 trainable; dtype "
          f"{c['dtype']} ({c['bytes_per_trainable_element']:.2f} B per trainable element); batch {c['batch_size']}, "
          f"anchors {c['anchor_batch_size']}, {c['cameras']} camera(s), prefix {c['prefix_tokens']} + "
          f"{c['action_tokens']} action tokens; gradient checkpointing "
          f"{'on' if c['gradient_checkpointing'] else 'off'}; "
          f"AdamW {c['optimizer']}")
    unit, scale = ("GiB", 1) if max(r["peak_gib"] for r in report["runs"]) >= 1 else ("MiB", 1024)
    print(f"{unit} at the step's peak; the peak's phase; transient (activations + temporaries) peak of the task pass "
          "and of the anchor pass")
    head = f"{'run':<13}" + "".join(f"{short:>8}" for _, short in COLUMNS)
    head += f"{'peak':>8}  {'at':<15}{'task':>7}{'anchor':>7}"
    head += "".join(f"{'/GPU x' + str(n):>10}" for n in c["shards"])
    print(head)
    for row in report["runs"]:
        line = f"{row['name']:<13}" + "".join(f"{row[key + '_gib'] * scale:>8.2f}" for key, _ in COLUMNS)
        anchor = row["anchor_pass_transient_peak_gib"]
        line += f"{row['peak_gib'] * scale:>8.2f}  {row['peak_phase']:<15}"
        line += f"{row['task_pass_transient_peak_gib'] * scale:>7.2f}"
        line += f"{anchor * scale:>7.2f}" if anchor is not None else f"{'-':>7}"
        line += "".join(f"{row['sharded_peak_gib'][str(n)] * scale:>10.2f}" for n in c["shards"])
        print(line)
    for check in report["checks"]:
        print(check)


def markdown_table(report: dict) -> str:
    """The table in Markdown, for benchmarks/RESULTS.md (GiB)."""
    shards = report["config"]["shards"]
    head = ["run", *[short for _, short in COLUMNS], "**peak**", "peak in", "task pass", "anchor pass"]
    head += [f"per GPU, FSDP x{n}" for n in shards]
    rows = []
    for row in report["runs"]:
        anchor = row["anchor_pass_transient_peak_gib"]
        cells = [row["name"], *[f"{row[key + '_gib']:.2f}" for key, _ in COLUMNS], f"**{row['peak_gib']:.2f}**",
                 row["peak_phase"], f"{row['task_pass_transient_peak_gib']:.2f}",
                 "-" if anchor is None else f"{anchor:.2f}"]
        cells += [f"{row['sharded_peak_gib'][str(n)]:.2f}" for n in shards]
        rows.append(cells)
    return table(head, rows)


def checks(report: dict) -> list[str]:
    """What the memory figures are held to, as lines of text (the targets are also booleans in the JSON's
    "targets"): each run's peak against lerobot's own step (<= 0.25 gradient buffers above it); CRaFT's
    against the plain step (<= 0.1 buffer where the peak is not inside the surgery, which needs T and R
    at once); CRaFT's anchor pass no larger than its task pass; when T and R live; host reads."""
    rows = {r["name"]: r for r in report["runs"]}
    targets = report["targets"]
    out = []
    plain, lerobot = rows.get("plain"), rows.get("lerobot")
    crafts = [name for name in rows if name.startswith("craft")]
    for name in crafts:
        r = rows[name]
        buffer = r["grad_buffer_gib"]
        if plain is not None:
            extra = r["peak_gib"] - plain["peak_gib"]
            if r["peak_phase"] == "surgery":
                verdict = "the peak is inside the surgery: target n/a"
            else:
                targets[f"{name}_vs_plain_ok"] = extra <= 0.1 * buffer
                verdict = f"target <= 0.10: {'met' if targets[f'{name}_vs_plain_ok'] else 'NOT met'}"
            out.append(f"{name}: peak - plain peak = {extra:+.2f} GiB ({extra / buffer:+.2f} gradient buffers; {verdict})")
        task_pass, anchor_pass = r["task_pass_transient_peak_gib"], r["anchor_pass_transient_peak_gib"]
        # within 1 MiB: with gradient checkpointing both passes can peak in the same layer's backward
        # (pi0 / pi0.5: the SigLIP tower at the same batch size), equal up to a few bytes of scalars
        targets[f"{name}_anchor_pass_ok"] = anchor_pass <= task_pass + 2**-10
        out.append(f"{name}: anchor pass transient peak {anchor_pass:.2f} vs task pass {task_pass:.2f} GiB "
                   f"({'met' if targets[f'{name}_anchor_pass_ok'] else 'NOT met'}); left of the task pass "
                   f"when the anchor forward starts: {r['transient_before_anchor_forward_gib'] * 1024:.1f} MiB")
    if lerobot is not None:
        for name in (["plain"] if plain is not None else []) + crafts:
            extra = rows[name]["peak_gib"] - lerobot["peak_gib"]
            buffer = rows[name]["grad_buffer_gib"]
            targets[f"{name}_vs_lerobot_ok"] = extra <= 0.25 * buffer
            out.append(f"{name} vs lerobot's own step: {extra:+.2f} GiB ({extra / buffer:+.2f} gradient buffers; "
                       f"target <= 0.25: {'met' if targets[f'{name}_vs_lerobot_ok'] else 'NOT met'})")
    for r in report["runs"]:
        if r["name"] == "lerobot":
            continue
        line = f"{r['name']}: T lives in {', '.join(r['task_grad_phases']) or 'no phase'}"
        if r["retain_grad_max_gib"] > 0:
            line += f"; R in {', '.join(r['retain_grad_phases'])}"
        out.append(line)
    for r in report["runs"]:
        reads = sum(r["host_reads_per_step"].values())
        out.append(f"{r['name']}: {reads} host reads of device values per step {r['host_reads_per_step']}")
    return out
