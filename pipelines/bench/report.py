"""The README's Performance table, rendered from a benchmark document."""

from __future__ import annotations


def _fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_table(doc: dict) -> str:
    """The README's Performance table from a benchmark document."""
    rows = [("measure", "figure", "target")]
    if doc.get("ingest"):
        i = doc["ingest"]
        rows.append(("ingest: Ray Data / single process (images/s)",
                     f"{_fmt(i['images_per_s'], '.0f')} / {_fmt(i['baseline_images_per_s'], '.0f')} = "
                     f"{_fmt(i['ratio'])}x, {_fmt(i['ratio_per_cpu'])} per CPU ({i['cpus']:g} CPUs)", ""))
        for size, row in (i.get("by_size") or {}).items():
            curve = ", ".join(f"{_fmt(v, '.0f')} at {c}" for c, v in row["images_per_s_by_cpus"].items())
            per_cpu = ", ".join(f"{_fmt(v)} at {c}" for c, v in row["ratio_per_cpu_by_cpus"].items())
            rows.append((f"ingest at {size} px: Ray Data limited to 1, 2... CPUs (images/s; single process "
                         f"{_fmt(row['baseline_images_per_s'], '.0f')})", f"{curve}; per CPU {per_cpu}",
                         f">= {row['target_per_cpu']:g} per CPU"))
    if doc.get("train_overhead"):
        t = doc["train_overhead"]
        rows.append((f"training step: Ray Train + DeepSpeed ZeRO-0 / plain PyTorch ({t['threads']} thread)",
                     f"{_fmt(t['ray_step_s'], '.3f')} s / {_fmt(t['plain_step_s'], '.3f')} s = {_fmt(t['ratio'])}",
                     "<= 1.10"))
    if doc.get("zero_memory"):
        z = doc["zero_memory"]
        rows.append(("ZeRO-3 / ZeRO-0 bytes per rank (params + grads + optimizer), 2 workers",
                     f"{z['stage3_bytes'] / 2**20:.1f} MiB / {z['stage0_bytes'] / 2**20:.1f} MiB = {_fmt(z['ratio'])}",
                     "<= 0.55"))
    if doc.get("scoring"):
        s = doc["scoring"]
        rows.append(("scoring chain, tiny, 10 DDIM steps: guidance off / on (images/s)",
                     f"{_fmt(s['images_per_s'], '.1f')} / {_fmt(s['guidance_images_per_s'], '.1f')} = "
                     f"{_fmt(s['ratio_vs_guidance'])}x", ""))
    if doc.get("metrics"):
        m = doc["metrics"]
        n, n_exact = m["n_maps"]["streaming"], m["n_maps"]["exact"]
        rows.append((f"metrics at {n_exact:,} maps of {m['size']}x{m['size']}: exact / streaming",
                     f"time {_fmt(m['speedup'], '.1f')}x, peak memory {_fmt(m['memory_ratio'], '.1f')}x "
                     f"(exact {m['exact']['peak_bytes'] / 2**20:.0f} MiB), largest difference "
                     f"{_fmt(m['max_abs_difference'], '.1e')}", ""))
        if n != n_exact:
            rows.append((f"streaming metrics at {n:,} maps", f"{m['streaming']['seconds']:.1f} s, peak "
                         f"{m['streaming']['peak_bytes'] / 2**20:.0f} MiB", ""))
    if doc.get("evaluation_memory"):
        e = doc["evaluation_memory"]
        for n, row in e["by_images"].items():
            for mode in (m for m in ("streaming", "exact") if m in row):
                r = row[mode]
                rows.append((f"evaluation driver, {int(n):,} test images of {e['image_size']} px ({mode}): "
                             "peak RSS growth (own memory)",
                             f"+{r['growth_bytes'] / 2**20:.0f} MiB (+{r['RssAnon_growth_bytes'] / 2**20:.0f} MiB), "
                             f"{r['seconds']:.0f} s", ""))
    if doc.get("category_scaling"):
        c = doc["category_scaling"]
        ingest = " / ".join(_fmt(c["ingest_images_per_s"][str(n)], ".0f") for n in c["categories"])
        steps = " / ".join(_fmt(c["train_step_s"][str(n)], ".3f") for n in c["categories"])
        rows.append(("ingest at 10 / 40 / 160 categories (images/s)",
                     f"{ingest} (160/10 = {_fmt(c['ingest_ratio_160_over_10'])})", "160/10 within 1 +- 0.10"))
        rows.append(("training step fed by Ray Data at 10 / 40 / 160 categories (s)",
                     f"{steps} (160/10 = {_fmt(c['train_ratio_160_over_10'])})", ""))
        for method, row in c["per_method"].items():
            extra = row.get("parameters_over_diad")
            if method != "diad" and extra:
                rows.append((f"{method} over diad at 160 categories (prototype banks, shared by all categories)",
                             f"+{extra:,} parameters ({16 * extra / 2**20:.1f} MiB to train), step time "
                             f"x{_fmt(row['step_ratio_over_diad'])}; +{row['parameters_per_category']:.0f} "
                             "parameters per category", ""))
    if doc.get("methods"):
        m = doc["methods"]
        for dataset in (k for k, v in m.items() if isinstance(v, dict)):
            for method in (k for k, v in m[dataset].items() if isinstance(v, dict)):
                r = m[dataset][method]
                rows.append((f"{method} on {dataset} ({m[dataset]['categories']} categories, demo budget, "
                             f"{r['protocol']}): image / pixel AUROC / AUPRO, training, scoring",
                             f"{_fmt(r['image_auroc'], '.3f')} / {_fmt(r['pixel_auroc'], '.3f')} / "
                             f"{_fmt(r['aupro'], '.3f')}, {_fmt(r['train_s'], '.0f')} s, "
                             f"{_fmt(r['scoring_images_per_s'], '.1f')} images/s", ""))
    if doc.get("drdc_refinement"):
        d = doc["drdc_refinement"]
        for dataset in (k for k, v in d.items() if isinstance(v, dict)):
            for label in (k for k, v in d[dataset].items() if isinstance(v, dict) and "image_auroc" in v):
                r = d[dataset][label]
                rows.append((f"drdc on {dataset}, {label}: image / pixel AUROC / AUPRO, scoring",
                             f"{_fmt(r['image_auroc'], '.3f')} / {_fmt(r['pixel_auroc'], '.3f')} / "
                             f"{_fmt(r['aupro'], '.3f')}, {_fmt(r['scoring_images_per_s'], '.2f')} images/s", ""))
            if d[dataset].get("fused_scoring_ratio_over_diad") is not None:
                rows.append((f"drdc fused scoring over diad's on {dataset}",
                             f"x{_fmt(d[dataset]['fused_scoring_ratio_over_diad'])}", ""))
    if doc.get("gpu"):
        g = doc["gpu"]
        rows.append((f"GPU {g['device']}: {g['preset']} training, batch {g['batch_size']}",
                     f"{_fmt(g['train_images_per_s'], '.1f')} images/s, MFU {_fmt(g['mfu'], '.1%')}", ""))
        rows.append(("GPU scoring latency per 256x256 image, 10 DDIM steps", f"{_fmt(g['score_latency_s'], '.3f')} s",
                     ""))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "| --- | --- | --- |")
    return "\n".join(lines)
