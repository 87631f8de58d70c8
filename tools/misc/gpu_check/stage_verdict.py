"""Verdicts of the GPU check's stages that can finish without doing their job.

A stage of ``gpu_check.sh`` that exits 0 has not necessarily done what its
name says: pytest exits 0 when every CUDA test skipped (after a failed
build), and the benchmark times the plain-PyTorch fallback when the plugin
has no kernel for the device. This reads what such a stage left behind,
prints one line for the summary (``ok (...)``, ``SKIPPED (...)`` or
``FAILED (...)``), and exits 1 only on FAILED.

tests: the JUnit XML of pytest. A test skipped because the CUDA kernels
cannot run (no device, no extension, no CUDA kernel) did not test them: on
the GPU machine that fails the stage, on a CPU machine (``--mode cpu``) it
makes the stage SKIPPED, with the reason. Other skips (two GPUs needed)
are counted and listed.

benchmark: the rows ``benchmark_msda.py --json`` wrote. FAILED if there is
no plugin row, if any plugin row ran the fallback rather than a compiled
kernel (those rows say FALLBACK), or if any plugin row failed.

Examples:
    python tools/misc/gpu_check/stage_verdict.py tests $OUT/tests.xml \
        --mode gpu --pytest-status 0
    python tools/misc/gpu_check/stage_verdict.py benchmark \
        $OUT/benchmark.json
"""
import argparse
import collections
import json
import os.path as osp
import sys
import xml.etree.ElementTree as ElementTree
from typing import List, Optional, Sequence, Tuple

# Skip reasons of the tests' fixtures meaning "the CUDA kernels did not
# run": no device, the extension missing, or built without CUDA.
KERNEL_MISSING_REASONS = ('no CUDA device', 'did not load',
                          'has no CUDA kernel')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    stages = parser.add_subparsers(dest='stage', required=True)
    tests = stages.add_parser('tests', help='verdict from a JUnit XML file')
    tests.add_argument('junit_xml')
    tests.add_argument('--mode', choices=['gpu', 'cpu'], default='gpu')
    tests.add_argument(
        '--pytest-status',
        type=int,
        default=0,
        help='the exit status of the pytest run that wrote the file')
    benchmark = stages.add_parser(
        'benchmark', help='verdict from benchmark_msda.py --json rows')
    benchmark.add_argument('rows_json')
    return parser.parse_args(argv)


def read_test_cases(path: str) -> List[Tuple[str, str, str]]:
    """(name, outcome, skip message) of every test case; outcome is passed,
    failed, error or skipped."""
    cases = []
    for case in ElementTree.parse(path).getroot().iter('testcase'):
        outcome, message = 'passed', ''
        for child in case:
            if child.tag in ('failure', 'error', 'skipped'):
                outcome = {'failure': 'failed'}.get(child.tag, child.tag)
                message = child.get('message', '')
                break
        cases.append((case.get('name', '?'), outcome, message))
    return cases


def tests_verdict(junit_xml: str, mode: str,
                  pytest_status: int) -> Tuple[str, str]:
    """(verdict word, detail) of the tests stage."""
    if not osp.isfile(junit_xml):
        return 'FAILED', (f'pytest exit {pytest_status} and no {junit_xml}: '
                          'it did not run')
    cases = read_test_cases(junit_xml)
    counts = collections.Counter(outcome for _, outcome, _ in cases)
    skips = [message for _, outcome, message in cases if outcome == 'skipped']
    kernel_skips = [
        message for message in skips
        if any(reason in message for reason in KERNEL_MISSING_REASONS)
    ]
    summary = ', '.join(f'{counts[outcome]} {outcome}'
                        for outcome in ('passed', 'failed', 'error', 'skipped')
                        if counts[outcome])
    if pytest_status != 0 or counts['failed'] or counts['error']:
        return 'FAILED', f'pytest exit {pytest_status}: {summary}'
    if not cases:
        return 'FAILED', 'no test was collected'
    if kernel_skips:
        reason = collections.Counter(kernel_skips).most_common(1)[0][0]
        detail = (f'{len(kernel_skips)} of {len(cases)} tests did not run '
                  f'the CUDA kernels: {reason}; {summary}')
        return ('SKIPPED' if mode == 'cpu' else 'FAILED'), detail
    if not counts['passed']:
        return 'SKIPPED', f'all {len(cases)} tests skipped'
    return 'ok', summary


def benchmark_verdict(rows_json: str) -> Tuple[str, str]:
    """(verdict word, detail) of the benchmark stage."""
    if not osp.isfile(rows_json):
        return 'FAILED', f'no {rows_json}: the benchmark wrote no row'
    with open(rows_json) as file:
        rows = json.load(file)
    plugin = [row for row in rows if row['implementation'] == 'ddetr_plugin']
    if not plugin:
        return 'FAILED', 'no ddetr_plugin row'
    fallback = [row for row in plugin if row.get('fallback')]
    if fallback:
        return 'FAILED', (f'{len(fallback)} of {len(plugin)} ddetr_plugin '
                          'rows timed the plain-PyTorch FALLBACK, not a '
                          'compiled kernel')
    failed = [row for row in plugin if 'ms' not in row]
    if failed:
        return 'FAILED', (f'{len(failed)} of {len(plugin)} ddetr_plugin rows '
                          f'failed: {failed[0].get("missing")}')
    return 'ok', (f'{len(plugin)} compiled ddetr_plugin rows, '
                  f'{len(rows) - len(plugin)} baseline rows')


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.stage == 'tests':
        verdict, detail = tests_verdict(args.junit_xml, args.mode,
                                        args.pytest_status)
    else:
        verdict, detail = benchmark_verdict(args.rows_json)
    print(f'{verdict} ({detail})')
    return 1 if verdict == 'FAILED' else 0


if __name__ == '__main__':
    sys.exit(main())
