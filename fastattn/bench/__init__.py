"""Benchmarks: the core shared by ``fastattn bench`` and the pytest-benchmark suite in ``bench/``.

What is measured, and how (the rules every number in a report follows):

* Work: one FLOP formula, :func:`attention_flops` (``cases.py``). The forward costs ``2 * (E + Ev)`` FLOPs
  per (query, key) pair the mask leaves visible (QK^T and PV), summed over batch and heads: causal attention
  counts the lower triangle only, a padded batch counts only its real keys. Backward = 2.5x forward (five
  matmuls against two); forward+backward = 3.5x. Softmax and other element-wise work are not counted.
* Time: one timer, :func:`time_interleaved` (``timing.py``). Each provider is warmed up, then timed in rounds
  of enough calls to last ``min_round_s``; the providers of a case take turns round by round, so background
  load hits them alike. We report the median time per call over the rounds and the interquartile range as
  the spread. CUDA rounds are bracketed by ``torch.cuda.synchronize()``.
* Ceiling: the throughput of a large square ``torch.mm`` in each dtype, measured in the same run with the
  same threads, is what the GFLOP/s are compared with ("% mm"). Memory-bound operations (decode) also give
  the bytes they read and GB/s, compared with the read bandwidth: ``torch.sum`` over 256 MiB (``ReadProbe``),
  timed in each such case's rounds as one more provider, its median against the rows' medians ("read bw",
  "% read bw"): a shared machine's memory bandwidth drifts within seconds, so a probe taken once per run would
  compare each case with another moment's machine. The probe reads past every cache, so each round of a
  provider starts with its inputs out of the last-level cache (as a decoder step does after the rest of the
  model ran); reports made before the probe joined the rounds are not comparable. The header also gives the
  probe's best of 5 at the start of the run.
* Memory (``memory.py``): the peak above what was live before one call. CPU: the process's resident-set
  high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim(0)`` hands
  cached free memory back), which also sees a C++ kernel's own scratch buffers. CUDA:
  ``torch.cuda.max_memory_allocated``. The long-sequence memory check runs each call in a fresh subprocess.

The modules, in the order a run uses them:

    cases.py      Case (one configuration), the FLOP formula
    registry.py   Operation, Provider, register(), the shared availability checks, select_cases()
    ops/          one module per operation (sdpa, additive, varlen, hard, decode), each registering itself
    timing.py     the timer, the timed call of a case (forward, or forward + backward), the matmul ceiling
    memory.py     peak memory of one call, in this process or a fresh one
    run.py        run_case(), run_memory_case(), run(): a selection -> the report
    report.py     Result rows, JSON, the tables, the summary, --compare
    plots.py      throughput.png, speedup.png
    command.py    ``fastattn bench``'s options and main()
    contend.py    ``fastattn bench --contend N``: the table again with N processes spinning on the cores
    encoders.py   model level: whole HuggingFace encoders on padded batches (bench/test_bench_packed.py)

Adding an operation: a module in ``ops/`` that builds an :class:`Operation` (cases, an input builder,
providers, a FLOP count) and :func:`register`s it, imported from ``ops/__init__.py``; ``fastattn bench --op
<name>`` and a three-line ``bench/test_bench_<op>.py`` pick it up.

Nothing here touches a GPU or imports matplotlib until a benchmark is actually run.
"""
from fastattn.bench import ops  # noqa: F401  (registers the operations)
from fastattn.bench.cases import DTYPES, MODE_FACTOR, Case, attention_flops, case_flops, visible_pairs
from fastattn.bench.encoders import ENCODER_PROVIDERS, load_encoders, mean_pooled, mixed_length_texts
from fastattn.bench.memory import MIB, cpu_memory_supported, memory_in_subprocess, peak_memory
from fastattn.bench.registry import (BASELINE, OPERATIONS, Operation, Provider, need_cpu_kernel, need_naive_memory,
                                     need_triton_kernel, register, select_cases)
from fastattn.bench.report import (Change, Result, compare_reports, format_bandwidth_table, format_compare,
                                   format_header, format_memory_table, format_summary, format_table, geomean, load_report,
                                   results_of, save_report)
from fastattn.bench.run import Progress, machine_info, run, run_case, run_memory_case
from fastattn.bench.timing import (FULL, QUICK, Settings, Timing, ceiling_for, make_call, matmul_ceiling,
                                   ReadProbe, read_bandwidth, synchronizer, time_interleaved)
from fastattn.bench.plots import plot
