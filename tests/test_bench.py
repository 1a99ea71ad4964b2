"""The benchmark commands run and print their ratios (smallest setting, one repeat: a smoke test, not a timing)."""

from __future__ import annotations

import re

import pytest


@pytest.mark.parametrize("name, ratio", [("apanet", "APANet/PFENet"), ("celp", "CELP/PFENet")])
def test_overhead_benchmarks_print_a_ratio(name, ratio, capsys):
    from fsseg.cli.bench import available, main

    assert name in available()
    main([name, "--only", "embedded-features", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    match = re.search(rf"{ratio} = (\d+\.\d\d)x", out)
    assert match and float(match.group(1)) > 0.5, out
