"""`shoal bench`: a side-by-side serving benchmark for any OpenAI- or Ollama-dialect server.

One run measures several targets (shoal, llama.cpp's server, vLLM, Ollama) with identical,
token-accurate prompts and fixed generation settings over a concurrency (or arrival-rate)
sweep, levels interleaved across targets. Modules, one job each:

    targets.py         the --target specs
    probe.py           validation before the run (reachable, dialect, model, server kind)
    tokens.py          counting tokens as a target's model does (its /tokenize, a file, an estimate)
    workloads.py       the presets and jsonl prompts, built to exact token lengths
    client.py          one streaming request per dialect, timed chunk by chunk
    load.py            closed-loop (concurrency) and open-loop (arrival rate) levels
    server_metrics.py  /metrics scrapes around each level and their deltas
    stats.py           a level's figures (throughput, percentiles, stalls, goodput)
    analysis.py        knee, saturation, oversaturation and the plain-words verdict
    results.py         the results JSON ("shoal-bench/1", bench_schema in docs/benchmarks.md)
    progress.py        live progress on the terminal
    report_text.py     the terminal table and the Markdown report
    report_html.py     the self-contained HTML report (report_plots.py: its matplotlib SVG plots)
    compare.py         per (target, level) changes against an earlier run, regressions flagged
    runner.py          the run itself: validate, prepare, warm up, sweep
    cli.py             the `shoal bench` subcommand
"""
