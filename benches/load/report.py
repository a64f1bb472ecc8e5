#!/usr/bin/env python3
"""Summarises the runs of benches/load.sh.

usage: report.py RUNS_JSONL OUT_JSON CONFIG_JSON

RUNS_JSONL has one object per measured wrk run (written by load.sh). Prints a markdown report
on stdout, writes everything (config, every run, per-scenario medians, ratios, checks) to
OUT_JSON, and exits 1 when a correctness check failed (errors, non-2xx, journal short of the
requests, a proxy that died).
"""
import json
import statistics
import sys

ADDED_P99_TARGET_US = 100
# In table order. `control` is a second nginx, identical to the baseline, in the interleaved
# constant-rate runs only.
TARGETS = ("baseline", "control", "tollgate")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(runs):
    """Median of every metric over the rounds of one (scenario, target, kind)."""
    w = [r["wrk"] for r in runs]
    dur = [x["duration_us"] / 1e6 for x in w]
    rps = [x["requests"] / d for x, d in zip(w, dur)]
    out = {
        "rounds": len(runs),
        "rps": median(rps),
        "rps_each": [round(x, 1) for x in rps],
        "requests": sum(x["requests"] for x in w),
        "latency_us": {
            k: median([x["latency_us"][k] for x in w])
            for k in ("p50", "p90", "p99", "p999", "mean", "max")
        },
        "p99_each_us": [x["latency_us"]["p99"] for x in w],
        # tollgate-loadgen only: sends that left more than 50 µs after their time.
        "late_sends": sum(x.get("late_sends", 0) for x in w),
        "errors": {
            k: sum(x["errors"][k] for x in w)
            for k in ("connect", "read", "write", "status", "timeout")
        },
        "proxy_cpu_s": median([r["proxy_cpu_s"] for r in runs]),
        "proxy_cpu_util": median([r["proxy_cpu_s"] / d for r, d in zip(runs, dur)]),
        "proxy_cpu_us_per_req": median(
            [r["proxy_cpu_s"] * 1e6 / max(x["requests"], 1) for r, x in zip(runs, w)]
        ),
        "mock_cpu_util": median([r["mock_cpu_s"] / d for r, d in zip(runs, dur)]),
        "load_cpu_util": median([r["load_cpu_s"] / d for r, d in zip(runs, dur)]),
        # CPU the machine spent on anything but proxy, mock and wrk (other processes, plus
        # some kernel/softirq time not charged to them): noise indicator, in cores.
        "other_cpu_util": median(
            [
                max(0.0, r["machine_busy_s"] - r["proxy_cpu_s"] - r["mock_cpu_s"] - r["load_cpu_s"]) / d
                for r, d in zip(runs, dur)
            ]
        ),
        "other_cpu_util_max": max(
            max(0.0, r["machine_busy_s"] - r["proxy_cpu_s"] - r["mock_cpu_s"] - r["load_cpu_s"]) / d
            for r, d in zip(runs, dur)
        ),
        "proxy_peak_rss_kb": max(r["proxy_rss_kb"] for r in runs),
        "alive": all(r["alive"] for r in runs),
    }
    out["noisy"] = any(r.get("noisy") for r in runs)
    if runs[0].get("rate"):
        out["rate"] = runs[0]["rate"]
    if runs[0].get("journal"):
        out["journal_lines"] = sum(r["journal_delta"] for r in runs)
        outcomes = {}
        for r in runs:
            for k, v in r["journal"]["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
        out["journal_outcomes"] = outcomes
        out["journal_read"] = sum(r["journal"].get("read", r["journal_delta"]) for r in runs)
        # Completed = written minus the other outcomes seen (entries in segments deleted after a
        # checkpoint were not read; they are counted as completed only if all read ones are).
        out["journal_completed"] = out["journal_lines"] - sum(
            v for k, v in outcomes.items() if k != "completed"
        )
        out["journal_completed_wrong_tokens"] = sum(
            r["journal"]["completed_wrong_tokens"] for r in runs
        )
        out["journal_distinct_keys"] = max(r["journal"]["distinct_keys"] for r in runs)
    return out


def p99_minus_baseline(groups, kind, sc, target):
    """Per round: the p99 of `target` minus the baseline's p99 of the same round."""
    base = {r["round"]: r["wrk"]["latency_us"]["p99"] for r in groups[(kind, sc, "baseline")]}
    return [
        r["wrk"]["latency_us"]["p99"] - base[r["round"]]
        for r in groups.get((kind, sc, target), [])
        if r["round"] in base
    ]


def bound_by(s, cpus):
    """Which core ran out in a max-throughput run (>= 93% busy), from the CPU utilisations."""
    load = {"proxy": s["proxy_cpu_util"], "mock": s["mock_cpu_util"], "wrk": s["load_cpu_util"]}
    where = {"proxy": cpus["proxy"], "mock": cpus["mock"], "wrk": cpus["load"]}
    if not all(where.values()):
        return "?"
    per_core = {}
    for name, core in where.items():
        per_core.setdefault(core, []).append(name)
    full = [
        "+".join(names) + f" (core {core})"
        for core, names in per_core.items()
        if sum(load[n] for n in names) >= 0.93
    ]
    return ", ".join(full) if full else "none (latency-bound)"


def fmt(x, nd=0):
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


def main():
    runs_path, out_path, config_path = sys.argv[1:4]
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    with open(config_path) as f:
        config = json.load(f)

    groups, noisy_groups = {}, {}
    for r in runs:
        key = (r["kind"], r["scenario"], r["target"])
        (noisy_groups if r.get("noisy") else groups).setdefault(key, []).append(r)
    # A group with no clean round at all falls back to its noisy ones (flagged below).
    fallback = [k for k in noisy_groups if k not in groups]
    for k in fallback:
        groups[k] = noisy_groups[k]
    scenarios = []
    for r in runs:
        if r["scenario"] not in scenarios:
            scenarios.append(r["scenario"])

    summary, problems = {}, []
    for kind in ("max", "half"):
        for sc in scenarios:
            block = {}
            for target in TARGETS:
                if (kind, sc, target) in groups:
                    block[target] = summarise(groups[(kind, sc, target)])
            if not block:
                continue
            b, t = block.get("baseline"), block.get("tollgate")
            if b and t:
                block["rps_ratio"] = t["rps"] / b["rps"] if b["rps"] else None
                block["added_p99_us"] = t["latency_us"]["p99"] - b["latency_us"]["p99"]
                block["added_p50_us"] = t["latency_us"]["p50"] - b["latency_us"]["p50"]
                if kind == "half":
                    # Round by round: with interleaved runs, the p99s of a round were
                    # measured over the same stretch of time.
                    block["added_p99_each_us"] = p99_minus_baseline(groups, kind, sc, "tollgate")
                    block["added_p99_target_us"] = ADDED_P99_TARGET_US
                    if config.get("interleave") and block["added_p99_each_us"]:
                        # Rounds are paired in time: judge by the median of their differences
                        # (the difference of the medians stays in added_p99_of_medians_us).
                        block["added_p99_of_medians_us"] = block["added_p99_us"]
                        block["added_p99_us"] = median(block["added_p99_each_us"])
                    ctl = block.get("control")
                    if ctl:
                        # A/A: two identical nginx; what their p99s differ by is noise.
                        block["control_p99_each_us"] = p99_minus_baseline(
                            groups, kind, sc, "control"
                        )
                        block["control_p99_us"] = median(block["control_p99_each_us"])
                    block["added_p99_ok"] = block["added_p99_us"] <= ADDED_P99_TARGET_US
            for target, s in ((k, v) for k, v in block.items() if k in TARGETS):
                errs = {k: v for k, v in s["errors"].items() if v}
                if errs:
                    problems.append(f"{kind}/{sc}/{target}: wrk errors {errs} (status = non-2xx/3xx)")
                if not s["alive"]:
                    problems.append(f"{kind}/{sc}/{target}: the proxy process died")
                if target == "tollgate" and "journal_lines" in s:
                    if s["journal_completed"] < s["requests"]:
                        problems.append(
                            f"{kind}/{sc}/tollgate: journal has {s['journal_completed']} new "
                            f"completed records ({s['journal_lines']} entries) < {s['requests']} "
                            f"requests wrk completed"
                        )
                    if s["journal_completed_wrong_tokens"]:
                        problems.append(
                            f"{kind}/{sc}/tollgate: {s['journal_completed_wrong_tokens']} "
                            f"completed records with a status or output token count that is wrong"
                        )
            summary.setdefault(kind, {})[sc] = block

    result = {
        "config": config,
        "summary": summary,
        "problems": problems,
        "ok": not problems,
        "runs": runs,
    }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)

    c = config
    print(f"## tollgate load benchmark ({c['git']}, {c['date']})\n")
    print(
        f"wrk -t{c['threads']} -c{c['connections']} -d{c['duration']} (x{c['rounds']} rounds, "
        f"medians; alternating baseline/tollgate), {c['nkeys']} keys, mock + proxy "
        f"1 worker thread each; CPUs: proxy={c['cpus']['proxy'] or 'any'} "
        f"mock={c['cpus']['mock'] or 'any'} load={c['cpus']['load'] or 'any'}, nice {c['nice']}\n"
    )
    head = (
        "| scenario | target | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | proxy CPU s "
        "| CPU µs/req | peak RSS MiB | CPU util proxy/mock/wrk | bound by | errors |"
    )
    sep = "|" + "---|" * 13
    for kind in ("max", "half"):
        if kind not in summary:
            continue
        if kind == "half":
            pacer = (
                f"tollgate-loadgen, {c['arrivals']} arrivals"
                if c.get("pacer") == "loadgen"
                else "wrk + Lua pacer: each millisecond's requests leave together"
            )
            turns = (
                f"; the proxies take {c['epoch_ms']} ms turns, shuffled, within each run"
                if c.get("pacer") == "loadgen" and c.get("interleave")
                else "; one run per target"
            )
            what = (
                f"{c['half_rate']:,} req/s (HALF_RATE)"
                if c.get("half_rate")
                else "half of tollgate's max req/s"
            )
            print(
                f"\n### Constant rate: {what} "
                f"({pacer}; the same rate for each proxy{turns})\n"
            )
        print(head)
        print(sep)
        for sc, block in summary[kind].items():
            for target in TARGETS:
                s = block.get(target)
                if not s:
                    continue
                lat = s["latency_us"]
                errs = sum(s["errors"].values())
                print(
                    f"| {sc}{' @' + fmt(s.get('rate')) + '/s' if kind == 'half' else ''} "
                    f"| {target} | {fmt(s['rps'])} | {fmt(lat['p50'])} | {fmt(lat['p90'])} "
                    f"| {fmt(lat['p99'])} | {fmt(lat['p999'])} | {fmt(s['proxy_cpu_s'], 2)} "
                    f"| {fmt(s['proxy_cpu_us_per_req'], 1)} | {fmt(s['proxy_peak_rss_kb'] / 1024, 1)} "
                    f"| {s['proxy_cpu_util']:.0%}/{s['mock_cpu_util']:.0%}/{s['load_cpu_util']:.0%} "
                    f"| {bound_by(s, c['cpus']) if kind == 'max' else '-'} | {errs} |"
                )
        print()
        for sc, block in summary[kind].items():
            if "rps_ratio" in block:
                line = (
                    f"- {sc}: tollgate/baseline req/s = {block['rps_ratio']:.2f}, "
                    f"added p99 = {block['added_p99_us']:+,.0f} µs, "
                    f"added p50 = {block['added_p50_us']:+,.0f} µs"
                )
                if kind == "half":
                    verdict = "PASS" if block["added_p99_ok"] else "FAIL"
                    line += f" (target <= {ADDED_P99_TARGET_US} µs: {verdict})"
                    if "added_p99_of_medians_us" in block:
                        line = line.replace("added p99 =", "added p99 (median of the rounds') =")
                    each = ", ".join(f"{x:+,}" for x in block["added_p99_each_us"])
                    line += f"; per round: {each}"
                    if c.get("pacer") == "loadgen":
                        late = sum(block[t]["late_sends"] for t in TARGETS if t in block)
                        sent = sum(block[t]["requests"] for t in TARGETS if t in block)
                        line += f"; sends > 50 µs late: {late / max(sent, 1):.0%}"
                    if block.get("control_p99_us") is not None:
                        aa = block["control_p99_each_us"]
                        line += (
                            f"\n  - A/A control (second nginx − baseline): p99 "
                            f"{block['control_p99_us']:+,.0f} µs, per round: "
                            + ", ".join(f"{x:+,}" for x in aa)
                        )
                        worst = max((abs(x) for x in aa), default=0)
                        if worst > ADDED_P99_TARGET_US:
                            line += (
                                f": two identical proxies differ by up to {worst:,} µs, so "
                                f"this run cannot resolve {ADDED_P99_TARGET_US} µs at p99"
                            )
                print(line)
            t = block.get("tollgate")
            if t and "journal_lines" in t:
                ok = "ok" if t["journal_completed"] >= t["requests"] else "SHORT"
                others = ", ".join(
                    f"{v:,} {k}" for k, v in t["journal_outcomes"].items() if k != "completed"
                )
                print(
                    f"  - metering: wrk completed {t['requests']:,} requests; journal +"
                    f"{t['journal_lines']:,} entries = {t['journal_completed']:,} completed"
                    f"{' + ' + others if others else ''} ({ok}; {t['journal_read']:,} read back "
                    f"(the rest checkpointed and deleted); "
                    f"{t['journal_completed_wrong_tokens']} with wrong tokens; "
                    f"{t['journal_distinct_keys']:,} distinct keys in one run)"
                )
    if c.get("half_note"):
        print(f"\n{c['half_note']}")
    print()
    discarded = sum(len(v) for k, v in noisy_groups.items() if k not in fallback)
    result["discarded_noisy_runs"] = discarded
    result["noisy_fallback"] = ["/".join(k) for k in fallback]
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    if discarded:
        print(
            f"{discarded} run(s) discarded and repeated: other processes used more than "
            f"{c['noise_max_cores']} cores meanwhile (kept in the JSON, marked noisy).\n"
        )
    if fallback:
        print(
            "**Warning: no undisturbed round for " + ", ".join(result["noisy_fallback"])
            + ": those medians come from noisy runs.**\n"
        )
    if problems:
        print("**PROBLEMS:**")
        for p in problems:
            print(f"- {p}")
    else:
        print("All checks passed: no errors or non-2xx responses, journal >= requests, proxies alive.")
    print(f"\nJSON: {out_path}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
